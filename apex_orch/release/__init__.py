"""Stage 5, release: a whole APEX set from one config, resumable, then a card and the Hub.

Takes: a release YAML (source, tiers, imatrix corpus, eval, baselines, publish target).
Gives: a release folder: every tier quantized and verified, evaluated against one base beside the
same-size baselines (`baselines`: measured, never published), the model card (`card`, with
`card_facts` and `card_results`), the published calibration (`calibration`), LocalAI gallery
entries (`localai`) and, with `--push`, one Hub commit (`publish`). Phases run in order (fetch,
convert, imatrix, quantize, eval, card, publish); each one skips what its manifests show is already
done. The heavy work (imatrix, one quantization and one evaluation per tier) goes through an
`executor`: this process, or a Ray cluster (`ray_executor`, the only module that imports Ray;
docs/distributed.md).
"""
