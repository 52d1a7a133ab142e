"""A deploy that replaces a field and adds another in one migration: the
gift note removed and a plain note added in its stead (RemoveField and
AddField on one model: a column dropped and another added at once), and a
customer tier with a default."""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0006_constraints")]

    operations = [
        migrations.RemoveField(model_name="order", name="gift_note"),
        migrations.AddField(model_name="order", name="note", field=models.TextField(blank=True, null=True)),
        migrations.AddField(model_name="customer", name="tier", field=models.CharField(max_length=20, default="basic")),
    ]
