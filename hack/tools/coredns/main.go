// Command coredns is the cluster DNS of the multi-node local cluster: CoreDNS at the release
// pinned in go.mod, built with only the plugins its Corefile uses
// (dynvol/testing/cluster/dns.py writes it). There is no forward plugin, so it cannot send
// a query anywhere: names outside the cluster's zones are refused.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives is the order in which the plugins handle a query: the relative order of
// CoreDNS's own list (core/dnsserver/zdirectives.go), restricted to the plugins above.
var directives = []string{
	"ready",
	"health",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"kubernetes",
}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
