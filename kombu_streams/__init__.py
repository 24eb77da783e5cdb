"""kombu-streams: a Kombu transport (and so a Celery broker) on Redis Streams.

Importing the package registers the URL schemes ``redis-streams://``,
``rediss-streams://`` (TLS), ``redis-streams-cluster://`` and ``rediss-streams-cluster://``
(Redis Cluster), ``sentinel-streams://`` (Redis Sentinel; transport option ``master_name``)
and ``sentinels-streams://`` (Sentinel, TLS to the Redis servers) with Kombu, so
``Connection('redis-streams://127.0.0.1:6379/0')`` works. The unix socket form is
``redis-streams+socket:///path/to/redis.sock``. Without the import, name the transport:
``transport='kombu_streams.transport:Transport'``.
"""

from kombu.transport import TRANSPORT_ALIASES

from .limits import QueueArgumentsDiffer, QueueFull
from .transport import Transport

__all__ = ('Transport', 'QueueFull', 'QueueArgumentsDiffer', '__version__')
__version__ = '0.1.0'

for _scheme in ('redis-streams', 'rediss-streams', 'redis-streams-cluster',
                'rediss-streams-cluster', 'sentinel-streams', 'sentinels-streams'):
    TRANSPORT_ALIASES.setdefault(_scheme, 'kombu_streams.transport:Transport')
