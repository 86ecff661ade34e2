"""The embedded local cluster: real etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, kwok nodes, a metrics simulator and a real Prometheus, all as local processes."""
