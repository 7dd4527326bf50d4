"""The executors: what runs a step's model batches on the devices (`api.Executor`)."""
