"""The tenancy fixtures (an app with a stub authenticator, the admin helper) here too."""

from tests.broker.tenancy.conftest import admin, api, app_factory, tenancy_config  # noqa: F401
