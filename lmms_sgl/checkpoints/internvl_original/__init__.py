"""Original-layout (remote-code) InternVL checkpoints served as transformers-native ones.

The released InternVL2 / 2.5 / 3 repositories (``InternVLChatModel``) ship model code we never run.
This package reads their ``config.json``, tokenizer files and safetensors, and writes an equivalent
``InternVLForConditionalGeneration`` checkpoint:

* :mod:`.config`: recognise and validate the layout from ``config.json`` alone
  (``read_original_config``), and build the transformers ``InternVLConfig``;
* :mod:`.weights`: the tensor mapping (pure functions; InternLM2's fused ``wqkv`` split exactly);
* :mod:`.convert`: ``convert_checkpoint`` (streaming, deterministic), ``resolve_checkpoint`` (cached
  conversion on first use, file-locked) and the ``lmms-sgl-convert`` command;
* :mod:`.tokenizer`, :mod:`.templates`, :mod:`.processing`: tokenizer, chat format, image tiling.

Submodules are imported on demand (no imports here), so reading a config stays cheap. May import
``lmms_sgl.checkpoints.integrity`` and ``lmms_sgl.method``; never families or the pipeline.
"""
