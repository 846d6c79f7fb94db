"""The protocol of record and its metrics, with intervals and paired comparisons."""
