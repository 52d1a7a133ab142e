"""The shop as of its last migration."""
from django.db import models


class Customer(models.Model):
    name = models.CharField(max_length=200)
    email = models.EmailField()
    vip = models.BooleanField(default=False)
    points = models.IntegerField(default=0)
    tier = models.CharField(max_length=20, default="basic")


class Order(models.Model):
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True)
    note = models.TextField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(total__gte=0), name="shop_order_total_not_negative"),
        ]



class Shipment(models.Model):
    id = models.BigAutoField(primary_key=True)
    carrier = models.CharField(max_length=40)
    order = models.ForeignKey(Order, on_delete=models.CASCADE)


class Parcel(models.Model):
    weight = models.IntegerField()
    shipment = models.ForeignKey(Shipment, on_delete=models.CASCADE)
