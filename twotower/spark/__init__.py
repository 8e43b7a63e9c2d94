"""Spark jobs for data past one machine: ``twotower spark prepare`` and ``twotower spark score``.

- :mod:`twotower.spark.settings`: the prepare jobs' settings (no Spark import; also
  used by ``twotower prepare``, which writes the same directory without Spark);
- :mod:`twotower.spark.shards`: the prepared directory's format and its pyarrow reader
  (no Spark import);
- :mod:`twotower.spark.session`: the Spark session (local mode or a cluster's);
- :mod:`twotower.spark.tables`: reading and validating the input tables in Spark;
- :mod:`twotower.spark.split`: the EVALUATION.md split, as :mod:`towers.data.split` does it;
- :mod:`twotower.spark.encoders`: fitting the feature encoders in Spark;
- :mod:`twotower.spark.prepare`: the prepare job (split, encoders, training shards);
- :mod:`twotower.spark.score`: the offline batch jobs over a bundle (item vectors, top-k).

Importing this package does not import pyspark; each job module does when it is
imported, and needs the ``spark`` extra (pyspark) and Java.
"""
