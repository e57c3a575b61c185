"""The ground floor: infrastructure every other layer of ldmclip shares (atomic files, devices,
precision names, the launch lookup, user errors, input formats). It imports nothing else of ldmclip."""
