"""Callbacks for the trainers people use (optional extras).

- :mod:`covshift.integrations.huggingface`: ``ShiftProbeCallback``, a
  ``transformers.TrainerCallback`` (``pip install 'covshift[huggingface]'``);
- :mod:`covshift.integrations.lightning`: ``ShiftProbeCallback``, a Lightning
  ``Callback`` (``pip install 'covshift[lightning]'``).

Both attach a :class:`~covshift.probe.ShiftProbe` (and optionally gradient ICS) to the
trainer's model at train start, record every ``every`` optimizer steps of the
trainer's global step on rank 0, hand scalar summaries to the trainer's loggers and
the records to covshift's store, and remove every hook at train end. What they share
is :mod:`covshift.integrations._session`. Import the module of your trainer; this
package imports neither trainer.
"""
