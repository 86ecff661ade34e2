"""partita.control: the closed loop and the services behind the kopf handlers.

`inputs` turns DevicePools, Nodes, Observations and EdgeModels into the planner's typed
inputs; `step` is one pure turn of the loop for one model; `loop` is the single task that owns
every model's state and carries steps out; `status` writes that state into the EdgeModel's
status and reads it back after a restart; `models` and `pools` reconcile what the user applied
(fetch and profile a model, count a pool's nodes). Nothing here knows kopf.
"""
