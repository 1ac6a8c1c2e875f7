"""Device meshes, the logical-axis rules, and placing an engine replica on its mesh.

See docs/SHARDING.md. ``sharding`` depends on ``jax`` and ``ops`` only; nothing here names a model.
"""

from sharding.mesh import MeshShape, make_mesh, parse_mesh, replica_meshes, resolve_shape
from sharding.rules import RULES, ShardingError, plan_kv_heads, valid_tp_sizes
from sharding.sharder import Sharder

__all__ = ["RULES", "MeshShape", "Sharder", "ShardingError", "make_mesh", "parse_mesh",
           "plan_kv_heads", "replica_meshes", "resolve_shape", "valid_tp_sizes"]
