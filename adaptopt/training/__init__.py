"""Training: :class:`~.optimizer.AdaptiveOptimizer` and its checkpoint format
(:mod:`.optimizer_state`), the state machine's moving parts (:mod:`.transitions`), the
statistics hooks (:mod:`.layer_stats`, :mod:`.gradient_probes`), agreement between ranks
(:mod:`.distributed`) and the printed summary (:mod:`.summary`).

Imports: layers, surgery, scores, policies and the top-level leaves. Nothing of formats.
"""
