"""What a person sees of a sweep, all drawn from the same objects of :mod:`hpsweep.views.stats`:

- :mod:`~hpsweep.views.tables`: the terminal tables of ``hpsweep results`` and ``status``;
- :mod:`~hpsweep.views.live`: the live table of a running sweep;
- :mod:`~hpsweep.views.document`: a report's sections rendered to HTML and Markdown;
- :mod:`~hpsweep.views.figures`: the report's figures (matplotlib);
- :mod:`~hpsweep.views.report`: ``hpsweep report``, which assembles them.

Every number is written by :func:`hpsweep.fmt.fmt_value`.
"""
