package main

// front: the connections bench's upstream (bench/connections.py), Cohere's HTTPS API across a network
// with a round-trip time, stood in for by a TLS-terminating front before the project's emulator.
//
//	streamload front -addr 127.0.0.1:PORT -to 127.0.0.1:EMULATOR_PORT -rtt-ms 40 -ca-out CA.pem
//	    -stats-addr 127.0.0.1:PORT2
//
// What it models, per accepted connection: every byte from the client reaches the TLS server RTT/2
// after the front read it, and every byte the server writes leaves RTT/2 after it was written (a link
// with that one-way delay each way and no bandwidth limit); the connection's first bytes wait one RTT
// more, standing in for the TCP handshake a loopback connect skips (a real client can send nothing until
// the SYN-ACK is back). So a request on a new connection takes 3 RTT to its response with TLS 1.3
// (TCP 1 + TLS 1 + the request 1) and on a warm one 1 RTT. The TLS is real (Go's crypto/tls, TLS 1.3,
// a P-256 certificate for 127.0.0.1 from a CA made at start and written to -ca-out for the clients).
// Behind it, one plain TCP connection to the emulator per accepted connection carries the bytes as they
// are. GET http://STATS/stats answers {"connections": accepted, "handshakes": TLS handshakes completed}.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

func front(args []string) {
	fs := flag.NewFlagSet("front", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "TLS listen address")
	to := fs.String("to", "", "HOST:PORT of the plain-HTTP upstream behind the front")
	rttMs := fs.Float64("rtt-ms", 40, "round-trip time of the modelled link")
	caOut := fs.String("ca-out", "", "where to write the CA certificate (PEM) clients must trust")
	statsAddr := fs.String("stats-addr", "127.0.0.1:0", "plain-HTTP address of GET /stats")
	_ = fs.Parse(args)
	cert, caPEM, err := certificate()
	if err != nil {
		fail(err)
	}
	if err := os.WriteFile(*caOut, caPEM, 0o644); err != nil {
		fail(err)
	}
	rtt := time.Duration(*rttMs * float64(time.Millisecond))
	config := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	var connections, handshakes atomic.Int64
	stats := http.NewServeMux()
	stats.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]int64{
			"connections": connections.Load(), "handshakes": handshakes.Load(),
		})
	})
	go func() { fail(http.ListenAndServe(*statsAddr, stats)) }()
	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		fail(err)
	}
	for {
		raw, err := listener.Accept()
		if err != nil {
			fail(err)
		}
		connections.Add(1)
		go func() {
			conn := tls.Server(newDelayConn(raw, rtt/2, rtt), config)
			defer conn.Close()
			if conn.Handshake() != nil {
				return
			}
			handshakes.Add(1)
			up, err := net.Dial("tcp", *to)
			if err != nil {
				return
			}
			defer up.Close()
			go func() {
				_, _ = io.Copy(up, conn)
				_ = up.(*net.TCPConn).CloseWrite()
			}()
			_, _ = io.Copy(conn, up)
		}()
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

// certificate: a server certificate for 127.0.0.1 and localhost, and the PEM of the CA that signed it.
func certificate() (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "streamload front CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(2),
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, caPEM, nil
}

// timed: bytes and when they may be handed on.
type timed struct {
	data []byte
	at   time.Time
	err  error
}

// delayConn delays what is read from and written to a connection by a one-way delay each, and the first
// bytes read by `first` more. Writes return at once (the bytes are in flight); Close sends what is in
// flight first.
type delayConn struct {
	net.Conn
	oneWay  time.Duration
	in      chan timed
	pending []byte
	readErr error
	out     chan timed
	written chan struct{} // closed when the writer stopped
	closed  chan struct{} // closed by Close
	mu      sync.Mutex
	isShut  bool
}

func newDelayConn(conn net.Conn, oneWay, first time.Duration) *delayConn {
	d := &delayConn{
		Conn: conn, oneWay: oneWay, in: make(chan timed, 256), out: make(chan timed, 256),
		written: make(chan struct{}), closed: make(chan struct{}),
	}
	go d.reader(first)
	go d.writer()
	return d
}

func (d *delayConn) reader(first time.Duration) {
	extra := first
	for {
		buf := make([]byte, 32<<10)
		n, err := d.Conn.Read(buf)
		chunk := timed{buf[:n], time.Now().Add(d.oneWay + extra), err}
		if n > 0 {
			extra = 0
		}
		select {
		case d.in <- chunk:
		case <-d.closed:
			return
		}
		if err != nil {
			return
		}
	}
}

func (d *delayConn) Read(p []byte) (int, error) {
	for len(d.pending) == 0 {
		if d.readErr != nil {
			return 0, d.readErr
		}
		select {
		case chunk := <-d.in:
			time.Sleep(time.Until(chunk.at))
			d.pending, d.readErr = chunk.data, chunk.err
		case <-d.closed:
			return 0, net.ErrClosed
		}
	}
	n := copy(p, d.pending)
	d.pending = d.pending[n:]
	return n, nil
}

func (d *delayConn) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.isShut {
		return 0, net.ErrClosed
	}
	chunk := timed{append([]byte(nil), p...), time.Now().Add(d.oneWay), nil}
	select {
	case d.out <- chunk:
		return len(p), nil
	case <-d.written: // the writer stopped on an error
		return 0, errors.New("connection reset")
	}
}

func (d *delayConn) writer() {
	defer close(d.written)
	for chunk := range d.out {
		time.Sleep(time.Until(chunk.at))
		if _, err := d.Conn.Write(chunk.data); err != nil {
			return
		}
	}
}

// Deadlines are not passed on: crypto/tls sets an expired write deadline right after its close_notify,
// which would cut the bytes still in flight here.
func (d *delayConn) SetDeadline(time.Time) error      { return nil }
func (d *delayConn) SetWriteDeadline(time.Time) error { return nil }

func (d *delayConn) Close() error {
	d.mu.Lock()
	if d.isShut {
		d.mu.Unlock()
		return nil
	}
	d.isShut = true
	close(d.out)
	d.mu.Unlock()
	select { // what is in flight arrives before the connection closes
	case <-d.written:
	case <-time.After(5 * time.Second):
	}
	close(d.closed)
	return d.Conn.Close()
}
