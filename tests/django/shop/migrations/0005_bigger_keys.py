"""A later deploy: the shipments' integer key made a BigAutoField (and the
parcels' foreign key column with it)."""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0004_rename_and_delete")]

    operations = [
        migrations.AlterField(
            model_name="shipment",
            name="id",
            field=models.BigAutoField(primary_key=True, serialize=False),
        ),
    ]
