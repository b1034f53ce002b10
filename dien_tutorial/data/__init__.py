"""Behaviour logs and DIEN samples.

- :mod:`.log`: the canonical behaviour log every loader returns.
- :mod:`.amazon`: the McAuley Amazon 2014 files, the Toys & Games 5-core
  CSVs, and the ``user_id,item_id,time,cate_id`` CSV.
- :mod:`.simulate`: the embedded default, a seeded simulator of shoppers
  whose interest drifts.
- :mod:`.samples`: from a log to padded DIEN training tensors.
- :mod:`.download`: fetch the public Amazon files with a checksum check.
"""

from dien_tutorial.data.log import BehaviourLog, DataFormatError, LoadReport, validate_log

__all__ = ["BehaviourLog", "DataFormatError", "LoadReport", "validate_log"]
