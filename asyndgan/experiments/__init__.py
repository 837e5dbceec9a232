"""Experiments on top of the runtime: benchmarks and the segmentation evaluation. The core never imports this
package; it imports the core and the services.

Evaluation (``asyndgan eval``, ``python -m asyndgan.experiments.evaluate``; docs/evaluation.md):

- :mod:`.settings` — evaluation settings and options;
- :mod:`.datasets` — loading, pooling and splitting site data;
- :mod:`.generators` — AsynDGAN and centralised generator runs (the in-process loop of :mod:`asyndgan.local`);
- :mod:`.segmenter` — the U-Net segmenter and Dice;
- :mod:`.segmentation` — the segmentation-utility runs (conditions, seeds, worker pool);
- :mod:`.image_metrics` — SSIM, PSNR, L1;
- :mod:`.memorisation` — the memorisation audit;
- :mod:`.evaluation` — one setting end to end, and the whole evaluation; :mod:`.eval_progress` — its progress line
  (work done of the total, ETA), fed by the worker processes too;
- :mod:`.eval_report` — ``eval.md``; :mod:`.figures` — ``eval.png`` and the benchmark's ``bytes.png``.

Benchmarks (``make bench``: ``python -m asyndgan.experiments.bench``):

- :mod:`.codec_bench`, :mod:`.bytes_bench`, :mod:`.throughput` (in-process and distributed step time),
  :mod:`.emulated` (sites whose compute is a sleep), :mod:`.scaling`, :mod:`.synthesize_bench`;
- :mod:`.bench_sections` — each section's run, table and targets; :mod:`.tables` and :mod:`.timing` — output and
  measuring helpers.
"""
