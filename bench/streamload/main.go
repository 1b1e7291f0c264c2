// streamload: the streams bench's native parts (bench/streams.py), so neither the load nor the upstream
// eats the CPU of the gateway it measures.
//
//	streamload serve -addr 127.0.0.1:PORT -body STREAM.sse -chunk-delay-ms 50
//	    answers every POST with the SSE events of STREAM.sse (a stream recorded from the project's
//	    emulator, so the gateway sees Cohere's wire format), one event every chunk-delay-ms.
//	streamload load -url URL -body REQUEST.json -streams N [-ramp-ms MS] [-header 'Name: value']...
//	    opens N streams at once, each on its own connection (the streams start spread over ramp-ms),
//	    reads every event and prints one JSON object: failures (with -events E, a stream with fewer
//	    events is one), first-event and inter-event gap percentiles in ms, the events read and the most
//	    streams open at one time.
//	streamload front ... / streamload reqs ...
//	    the connections bench's HTTPS upstream with a round-trip time and its client: front.go, reqs.go.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: streamload serve|load|front|reqs [flags] (-h for each)")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "load":
		load(os.Args[2:])
	case "front":
		front(os.Args[2:])
	case "reqs":
		reqs(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q: serve, load, front or reqs\n", os.Args[1])
		os.Exit(2)
	}
}

// events splits an SSE body into its events, each with its blank-line terminator.
func events(body []byte) [][]byte {
	var out [][]byte
	for len(body) > 0 {
		i := bytes.Index(body, []byte("\n\n"))
		if i < 0 {
			out = append(out, append(body, '\n', '\n'))
			break
		}
		out = append(out, body[:i+2])
		body = body[i+2:]
	}
	return out
}

func readOrExit(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	return data
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	bodyPath := fs.String("body", "", "the SSE stream to replay")
	delayMs := fs.Float64("chunk-delay-ms", 50, "pause between events")
	_ = fs.Parse(args)
	parts := events(readOrExit(*bodyPath))
	delay := time.Duration(*delayMs * float64(time.Millisecond))
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.WriteHeader(http.StatusOK)
		flusher := w.(http.Flusher)
		for i, part := range parts {
			if i > 0 {
				time.Sleep(delay)
			}
			if _, err := w.Write(part); err != nil {
				return
			}
			flusher.Flush()
		}
	})
	server := &http.Server{Addr: *addr, Handler: handler, ReadHeaderTimeout: 30 * time.Second}
	if err := server.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

type result struct {
	err     string
	first   time.Duration
	gaps    []time.Duration
	nevents int
}

func load(args []string) {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	url := fs.String("url", "", "where to POST")
	bodyPath := fs.String("body", "", "the request body (JSON)")
	streams := fs.Int("streams", 100, "streams opened together")
	rampMs := fs.Int("ramp-ms", 1000, "the starts are spread over this long")
	timeout := fs.Duration("timeout", 5*time.Minute, "a stream not finished by then fails")
	want := fs.Int("events", 0, "a stream with fewer events fails (0: any number)")
	var hs headers
	fs.Var(&hs, "header", "'Name: value', repeatable")
	_ = fs.Parse(args)
	body := readOrExit(*bodyPath)
	// Each stream on a new connection, as serverless clients make them.
	client := &http.Client{
		Timeout:   *timeout,
		Transport: &http.Transport{DisableKeepAlives: true, MaxIdleConnsPerHost: -1},
	}
	var open, peak atomic.Int64
	results := make([]result, *streams)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *streams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if *streams > 1 {
				time.Sleep(time.Duration(*rampMs) * time.Millisecond * time.Duration(i) / time.Duration(*streams))
			}
			results[i] = one(client, *url, body, hs, &open, &peak)
			if results[i].err == "" && results[i].nevents < *want {
				results[i] = result{err: fmt.Sprintf("short stream (%d of %d events)", results[i].nevents, *want)}
			}
		}(i)
	}
	wg.Wait()
	wall := time.Since(start)

	var firsts, gaps []float64
	failures, total := 0, 0
	errs := map[string]int{}
	for _, r := range results {
		if r.err != "" {
			failures++
			errs[r.err]++
			continue
		}
		total += r.nevents
		firsts = append(firsts, ms(r.first))
		for _, g := range r.gaps {
			gaps = append(gaps, ms(g))
		}
	}
	out := map[string]any{
		"streams":        *streams,
		"failures":       failures,
		"errors":         errs,
		"events":         total,
		"peak_open":      peak.Load(),
		"wall_s":         wall.Seconds(),
		"first_p50_ms":   pct(firsts, 50),
		"first_p99_ms":   pct(firsts, 99),
		"gap_p50_ms":     pct(gaps, 50),
		"gap_p99_ms":     pct(gaps, 99),
		"gap_max_ms":     pct(gaps, 100),
		"gaps_measured":  len(gaps),
		"first_measured": len(firsts),
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

func one(client *http.Client, url string, body []byte, hs headers, open, peak *atomic.Int64) result {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return result{err: err.Error()}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	for _, h := range hs {
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return result{err: short(err)}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return result{err: fmt.Sprintf("status %d", resp.StatusCode)}
	}
	n := open.Add(1)
	defer open.Add(-1)
	for {
		p := peak.Load()
		if n <= p || peak.CompareAndSwap(p, n) {
			break
		}
	}
	r := result{}
	reader := bufio.NewReaderSize(resp.Body, 64<<10)
	last := t0
	for {
		line, err := reader.ReadSlice('\n')
		if len(bytes.TrimRight(line, "\r\n")) == 0 && len(line) > 0 {
			// a blank line ends an event
			now := time.Now()
			if r.nevents == 0 {
				r.first = now.Sub(t0)
			} else {
				r.gaps = append(r.gaps, now.Sub(last))
			}
			last = now
			r.nevents++
		}
		if err == io.EOF {
			break
		}
		if err != nil && err != bufio.ErrBufferFull {
			return result{err: short(err)}
		}
	}
	if r.nevents == 0 {
		return result{err: "no event"}
	}
	return r
}

func short(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		return s[i+2:]
	}
	return s
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func pct(values []float64, p float64) float64 {
	if len(values) == 0 {
		return 0
	}
	sort.Float64s(values)
	i := int(float64(len(values)-1) * p / 100)
	return values[i]
}
