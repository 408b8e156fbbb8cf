//go:build tools

// Package tools pins the etcd server command the sandbox builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
