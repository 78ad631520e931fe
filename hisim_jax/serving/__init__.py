"""One replica and many: workloads, the tiered KV cache, scheduler policies, the engine loop,
routers and clusters, metrics."""
