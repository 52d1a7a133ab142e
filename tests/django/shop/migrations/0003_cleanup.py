"""The next deploy: a field the code no longer uses removed."""
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_deploy")]

    operations = [
        migrations.RemoveField(model_name="customer", name="legacy_code"),
    ]
