package main

// reqs: the connections bench's client (bench/connections.py).
//
//	streamload reqs -url URL -body REQUEST.json -requests N -concurrency C [-new-conn] [-ca CA.pem]
//	    [-header 'Name: value']...
//	    sends N POSTs from C workers, each request on a new connection (-new-conn: as serverless
//	    clients do) or over C kept-alive connections, reads every body whole and prints one JSON object:
//	    requests answered 200, failures (by error), latency p50/p99/mean in ms (request written to
//	    body read) and the wall time.

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func reqs(args []string) {
	fs := flag.NewFlagSet("reqs", flag.ExitOnError)
	url := fs.String("url", "", "where to POST")
	bodyPath := fs.String("body", "", "the request body (JSON)")
	total := fs.Int("requests", 100, "requests to send")
	concurrency := fs.Int("concurrency", 1, "requests in flight at once")
	newConn := fs.Bool("new-conn", false, "each request on a new connection")
	caPath := fs.String("ca", "", "PEM of the CA an https URL's certificate is checked against")
	timeout := fs.Duration("timeout", time.Minute, "a request not answered by then fails")
	var hs headers
	fs.Var(&hs, "header", "'Name: value', repeatable")
	_ = fs.Parse(args)
	body := readOrExit(*bodyPath)
	transport := &http.Transport{
		DisableKeepAlives:   *newConn,
		MaxIdleConnsPerHost: *concurrency,
		MaxConnsPerHost:     *concurrency,
		ForceAttemptHTTP2:   false,
	}
	if *caPath != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(readOrExit(*caPath)) {
			fail(fmt.Errorf("no certificate in %s", *caPath))
		}
		transport.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	client := &http.Client{Timeout: *timeout, Transport: transport}
	var next atomic.Int64
	var mu sync.Mutex
	var latencies []float64
	errs := map[string]int{}
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(*total) {
				took, err := post(client, *url, body, hs)
				mu.Lock()
				if err != "" {
					errs[err]++
				} else {
					latencies = append(latencies, ms(took))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	failures := 0
	for _, n := range errs {
		failures += n
	}
	sum := 0.0
	for _, l := range latencies {
		sum += l
	}
	mean := 0.0
	if len(latencies) > 0 {
		mean = sum / float64(len(latencies))
	}
	out := map[string]any{
		"requests": len(latencies),
		"failures": failures,
		"errors":   errs,
		"p50_ms":   pct(latencies, 50),
		"p99_ms":   pct(latencies, 99),
		"mean_ms":  mean,
		"wall_s":   wall.Seconds(),
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

func post(client *http.Client, url string, body []byte, hs headers) (time.Duration, string) {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, err.Error()
	}
	req.Header.Set("Content-Type", "application/json")
	for _, h := range hs {
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, short(err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, short(err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Sprintf("status %d", resp.StatusCode)
	}
	return time.Since(t0), ""
}
