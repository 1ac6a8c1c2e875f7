"""The 8-simulated-device worker of the sharding tests, shared: the sharded exports run there."""

from tests.sharding.conftest import mesh_worker  # noqa: F401  (a fixture, used by name)
