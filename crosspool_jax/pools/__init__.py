"""Host-side managers of the device memory pools (KV-cache pool, weights pool)."""
