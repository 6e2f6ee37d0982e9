"""Speed and memory benchmarks of every bound method (issue 7, SPEC §10).

One command: ``python -m benchmarks.run`` (see ``docs/benchmarks.md``).
Modules: ``networks`` (the product's networks it measures), ``machine`` (what we ran on),
``measure`` (one measurement of one configuration), ``worker`` (runs one measurement in a
fresh process, so the RSS high-water mark belongs to that configuration alone),
``report`` (table, targets, JSON and docs), ``run`` (the command), ``peer`` (auto_LiRPA's
analogues, when it is importable), ``profile`` (torch.profiler view of one method's
training step).
"""
