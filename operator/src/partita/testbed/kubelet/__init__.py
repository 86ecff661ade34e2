"""The local cluster's kubelet: every pod the scheduler puts on a simulated node runs as a real
local process, and Service traffic between those nodes is routed and shaped like their links.

    python -m partita.testbed.kubelet --run-dir DIR

- `podspec`: a pod spec read for this machine (volumes, env, probes, limits); no API calls.
- `images`: which container images the test bed can run, and as which local program.
- `informer`: list+watch caches of pods, nodes, Services and EndpointSlices.
- `tokens`: ServiceAccount tokens projected into pods (TokenRequest, refreshed before expiry).
- `sandbox`: a pod process's own mount namespace, its volumes at their mountPaths.
- `pods`: one pod's process: start, probe, restart with back-off, terminate, status.
- `serviceproxy`: kube-proxy's part (node proxies, entry listeners, the `kubernetes` Service).
- `targets`: the files the test bed, the demo and Prometheus read (services.json, agent.json,
  the stage servers' scrape targets).
- `agent`: the sync loop that ties them together.

The operator never knows: only this package knows it is a test bed.
"""
