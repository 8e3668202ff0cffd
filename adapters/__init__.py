"""Test-time training: the `Trainer` that schedules requests into the adapter slots of a `BatchedStep`
(one forward and backward for all of them), the contract it is called with (`spec`: `TrainSpec`,
`TrainRequest`, `TrainStep`, `TrainResult`), its configuration, and the adapter as it leaves the trainer
(`AdapterBlob`: PEFT bytes) and as a node writes it to disk (`AdapterHandle`, owned and deleted); and expert
merging: one expert adapter per cluster of an index, built once (`expert_build`), weighed by the prompt and
summed into one adapter per request (`merge`, `low_rank`, `experts`); and reuse: the cache that reuses
identical training (`cache`) and the sessions that carry a conversation's training state between its turns
(`state`, `sessions`), both kept within a byte budget (`lru`)."""
