"""A later deploy: a field renamed, and a model deleted."""
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0003_cleanup")]

    operations = [
        migrations.RenameField(model_name="customer", old_name="loyalty_points", new_name="points"),
        migrations.DeleteModel(name="Coupon"),
    ]
