"""The tiers: their slots and lifecycle (registry), which tier a request names (routing), each
model family's engine behind a worker thread or a micro-batcher. Imports neither `service.serving`
nor `service.jobs`."""
