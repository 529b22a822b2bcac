"""The join: funnel state machine, watermarks, label stores, the join driver and the faust app."""
