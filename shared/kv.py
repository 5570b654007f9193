"""JetStream key-value buckets: opened, or created on first use."""

from __future__ import annotations

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue


async def open_or_create_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket `config.bucket`, created with `config` on first use. Idempotent and safe when
    replicas race: a bucket another replica created meanwhile (possibly with other settings,
    e.g. a TTL) is used as it is."""
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except nats.js.errors.APIError:
        return await js.key_value(config.bucket)
