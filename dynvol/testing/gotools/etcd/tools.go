//go:build tools

// Package tools pins the etcd server that `dynvol dev tools install` builds (its main
// package is the module's root).
package tools

import _ "go.etcd.io/etcd/server/v3"
