"""The first deploy made while pgferry syncs: fields added (NOT NULL with a
default, which Django adds with the default and then drops), an index, and
a new model with a foreign key."""
from django.db import migrations, models
import django.db.models.deletion


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [
        migrations.AddField(model_name="customer", name="vip", field=models.BooleanField(default=False)),
        migrations.AddField(model_name="customer", name="loyalty_points", field=models.IntegerField(default=0)),
        migrations.AddField(model_name="order", name="gift_note", field=models.TextField(blank=True, null=True)),
        migrations.AddIndex(model_name="order", index=models.Index(fields=["created_at"], name="shop_order_created")),
        migrations.CreateModel(
            name="Coupon",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("code", models.CharField(max_length=32, unique=True)),
                ("percent", models.PositiveSmallIntegerField(default=10)),
                (
                    "order",
                    models.ForeignKey(null=True, on_delete=django.db.models.deletion.SET_NULL, to="shop.order"),
                ),
            ],
        ),
    ]
