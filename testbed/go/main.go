// Command partita-kube is the local cluster's multi-call binary: one build of
// etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and
// kwok at pinned versions, so the Go packages they share compile and link once.
//
// Usage: partita-kube COMPONENT [ARGS...], or call it through a symlink named
// after the component.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kwokconfig "sigs.k8s.io/kwok/pkg/config"
	kwokcmd "sigs.k8s.io/kwok/pkg/kwok/cmd"
	kwoklog "sigs.k8s.io/kwok/pkg/log"
	"sigs.k8s.io/kwok/pkg/utils/signals"
)

var components = map[string]func(args []string) int{
	"etcd": func(args []string) int {
		etcdmain.Main(append([]string{"etcd"}, args...))
		return 0
	},
	"kube-apiserver": func(args []string) int {
		c := apiserver.NewAPIServerCommand()
		c.SetArgs(args)
		return cli.Run(c)
	},
	"kube-controller-manager": func(args []string) int {
		c := controllermanager.NewControllerManagerCommand()
		c.SetArgs(args)
		return cli.Run(c)
	},
	"kube-scheduler": func(args []string) int {
		c := scheduler.NewSchedulerCommand()
		c.SetArgs(args)
		return cli.Run(c)
	},
	"kubectl": func(args []string) int {
		os.Args = append([]string{"kubectl"}, args...)
		logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) //nolint:errcheck
		c := kubectlcmd.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(c); err != nil {
			kubectlutil.CheckErr(err)
		}
		return 0
	},
	"kwok": func(args []string) int {
		// The Kubernetes packages linked into this binary register their global flags
		// (klog, --version as a non-bool) at init; kwok's own command must not see them.
		flag.CommandLine = flag.NewFlagSet("kwok", flag.ContinueOnError)
		pflag.CommandLine = pflag.NewFlagSet("kwok", pflag.ContinueOnError)
		flagset := pflag.NewFlagSet("global", pflag.ContinueOnError)
		flagset.ParseErrorsAllowlist.UnknownFlags = true
		flagset.Usage = func() {}
		os.Args = append([]string{"kwok"}, args...)
		ctx := signals.SetupSignalContext()
		ctx, logger := kwoklog.InitFlags(ctx, flagset)
		ctx, err := kwokconfig.InitFlags(ctx, flagset)
		if err != nil {
			logger.Error("Init config flags", "err", err)
			return 1
		}
		c := kwokcmd.NewCommand(ctx)
		c.PersistentFlags().AddFlagSet(flagset)
		c.SetArgs(args)
		if err := c.ExecuteContext(ctx); err != nil {
			logger.Error("Execute exit", "err", err)
			return 1
		}
		return 0
	},
}

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	run, ok := components[name]
	if !ok && len(args) > 0 {
		name, args = args[0], args[1:]
		run, ok = components[name]
	}
	if !ok {
		names := make([]string, 0, len(components))
		for n := range components {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintf(os.Stderr, "usage: partita-kube COMPONENT [ARGS...]\ncomponents: %s\n", strings.Join(names, ", "))
		os.Exit(2)
	}
	os.Exit(run(args))
}
