"""The layer-wise engine: it knows no stage by name.

* :mod:`draftkit.engine.layers`: where a stage gets its decoder layers, resident (:class:`ResidentLayers`) or
  read one at a time from the safetensors shards and written out as each is done (:class:`StreamedLayers`);
* :mod:`draftkit.engine.forward`: the generic layer forward, capturing what every layer receives
  (:func:`capture_layer_inputs`) and running one layer on one chunk of calibration tokens (:func:`run_layer`);
* :mod:`draftkit.engine.placement`: streamed or resident and where activations wait, decided before any weights
  load from the one memory estimate (:mod:`draftkit.memory`), and the writer of a streamed stage's folder.

A stage plugs in with its per-layer form (``layers`` in :mod:`draftkit.registry`): prune scoring
(:mod:`draftkit.prune.layerwise`), SparseGPT/Wanda/magnitude (:mod:`draftkit.sparsify.layerwise`) and the streamed
perplexity (:mod:`draftkit.evaluate.streamed`). The lazy tensor reads and the shard writer stay in
:mod:`draftkit.checkpoint`.
"""
