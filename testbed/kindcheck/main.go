// kindcheck decodes a kind cluster configuration strictly with kind's own v1alpha4 types, the
// way `kind create cluster --config` reads it, without Docker: unknown fields, wrong types and
// an unexpected kind/apiVersion are errors. It prints each node's role and labels.
//
//	go run . ../../kind-config.yaml
package main

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/yaml"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kindcheck KIND-CONFIG.yaml")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var cluster v1alpha4.Cluster
	if err := yaml.UnmarshalStrict(raw, &cluster); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	if cluster.Kind != "Cluster" || cluster.APIVersion != "kind.x-k8s.io/v1alpha4" {
		fmt.Fprintf(os.Stderr, "%s: kind %q apiVersion %q, want Cluster kind.x-k8s.io/v1alpha4\n",
			os.Args[1], cluster.Kind, cluster.APIVersion)
		os.Exit(1)
	}
	v1alpha4.SetDefaultsCluster(&cluster)
	for i, node := range cluster.Nodes {
		keys := make([]string, 0, len(node.Labels))
		for k := range node.Labels {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		pairs := make([]string, 0, len(keys))
		for _, k := range keys {
			pairs = append(pairs, k+"="+node.Labels[k])
		}
		fmt.Printf("%d %s %s\n", i, node.Role, strings.Join(pairs, ","))
	}
}
