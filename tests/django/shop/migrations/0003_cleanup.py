"""The next deploy: a field the code no longer uses removed, and names
allowed to be longer."""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_deploy")]

    operations = [
        migrations.RemoveField(model_name="customer", name="legacy_code"),
        migrations.AlterField(model_name="customer", name="name", field=models.CharField(max_length=200)),
    ]
