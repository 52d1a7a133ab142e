"""A later deploy: a CHECK constraint added, an email no longer unique, and
an index removed."""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0005_bigger_keys")]

    operations = [
        migrations.AddConstraint(
            model_name="order",
            constraint=models.CheckConstraint(condition=models.Q(total__gte=0), name="shop_order_total_not_negative"),
        ),
        migrations.AlterField(model_name="customer", name="email", field=models.EmailField(max_length=254)),
        migrations.RemoveIndex(model_name="order", name="shop_order_created"),
    ]
