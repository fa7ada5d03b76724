"""What a trial measures: the names of the metrics (:mod:`.names`), evaluation on the splits and the
sharpness metrics (:mod:`.sharpness`)."""
