"""Settings of the deploy test's project: the database from the
environment (the test's source cluster, as the application's role)."""
import os

SECRET_KEY = "pgferry-deploy-test"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["shop"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ["FERRYSHOP_HOST"],
        "PORT": os.environ["FERRYSHOP_PORT"],
        "NAME": os.environ["FERRYSHOP_DB"],
        "USER": os.environ["FERRYSHOP_USER"],
        "PASSWORD": os.environ["FERRYSHOP_PASSWORD"],
    }
}
