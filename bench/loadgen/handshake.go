package main

// Handshake mode (-handshakes): how many new v2 sessions a server sets up a
// second, rather than how fast it fans lines out. -concurrency goroutines each
// dial, offer chat.v2, say hello (nick c<w>, or with -tokens the token on line
// w) and wait for the welcome, then reset the connection and start over, for
// -duration. What a user pays to enter the chat is all in there: TCP accept,
// the HTTP upgrade, the hello's parsing and, in token mode, the JWT's
// verification and the per-user count. The connection is reset, not closed
// with a close frame, so that neither side keeps it in TIME_WAIT: thousands a
// second would use up the loopback's port range within a run.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

const (
	welcomePrefix = `{"type":"welcome",`
	errorPrefix   = `{"type":"error",`
	// How long one handshake may take, from the dial to the welcome.
	handshakeTimeout = 10 * time.Second
)

// hsResult is what a handshake run prints, as a table line or a JSON line.
type hsResult struct {
	URL            string  `json:"url"`
	Mode           string  `json:"mode"` // "handshakes"
	Concurrency    int     `json:"concurrency"`
	Token          bool    `json:"token"` // hellos carried tokens (-tokens)
	DurationS      float64 `json:"duration_s"`
	Handshakes     int64   `json:"handshakes"` // welcomes received within -duration
	HandshakesPerS float64 `json:"handshakes_per_s"`
	Failures       int64   `json:"failures"`   // a dial, upgrade or read that failed
	Errors         int64   `json:"errors"`     // an `error` event answered a hello
	Unexpected     int64   `json:"unexpected"` // another event before the welcome, or a welcome without user in token mode
	// From the dial to the welcome.
	P50Ms         float64 `json:"p50_ms"`
	P90Ms         float64 `json:"p90_ms"`
	P99Ms         float64 `json:"p99_ms"`
	MaxMs         float64 `json:"max_ms"`
	LoadgenCPUPct float64 `json:"loadgen_cpu_pct"`
}

var errRefused = errors.New("hello refused")

// hsCounts are the handshake workers' shared counters (errors and surprises go to the
// bench's own, as in the other modes).
type hsCounts struct {
	done, failures atomic.Int64
}

// handshakes runs handshake mode and returns its result.
func (b *bench) handshakes() hsResult {
	cfg := b.cfg
	var counts hsCounts
	progress("sending")
	cpu0, start := cpuTime(), time.Now()
	end := start.Add(cfg.duration)
	var wg sync.WaitGroup
	for w := 0; w < cfg.concurrency; w++ {
		wg.Add(1)
		go func(w int) { defer wg.Done(); b.handshakeLoop(w, end, &counts) }(w)
	}
	// The send phase ends at end, not when the last handshake in flight does: run.py reads
	// the server's CPU time when "# sent" comes.
	time.Sleep(time.Until(end))
	cpu1, handshakes := cpuTime(), counts.done.Load()
	progress("sent")
	wg.Wait()
	if handshakes == 0 {
		fatal("no handshake succeeded (%d failures, %d errors)", counts.failures.Load(), b.errors.Load())
	}
	wall := end.Sub(start).Seconds()
	return hsResult{
		URL: cfg.url, Mode: "handshakes", Concurrency: cfg.concurrency, Token: len(b.tokens) > 0,
		DurationS: cfg.duration.Seconds(), Handshakes: handshakes, HandshakesPerS: round(float64(handshakes) / wall),
		Failures: counts.failures.Load(), Errors: b.errors.Load(), Unexpected: b.unexpected.Load(),
		P50Ms: b.percentile(0.50), P90Ms: b.percentile(0.90), P99Ms: b.percentile(0.99),
		MaxMs: round(float64(b.maxLatency.Load()) / 1e6), LoadgenCPUPct: round(100 * (cpu1 - cpu0).Seconds() / wall),
	}
}

// handshakeLoop is worker w: one handshake after another until end, counting
// those whose welcome came by then.
func (b *bench) handshakeLoop(w int, end time.Time, counts *hsCounts) {
	hello := b.appendHello(nil, w)
	buf := make([]byte, 4096)
	for t0 := time.Now(); t0.Before(end); t0 = time.Now() {
		err := b.handshakeOnce(hello, buf)
		t1 := time.Now()
		switch {
		case err == nil && !t1.After(end):
			counts.done.Add(1)
			b.record(t1.Sub(t0).Nanoseconds())
		case err == nil || errors.Is(err, errRefused):
		default:
			if counts.failures.Add(1) <= 3 {
				progress("worker %d: %v", w, err)
			}
			time.Sleep(10 * time.Millisecond) // a server that is gone: do not spin
		}
	}
}

// handshakeOnce dials, says hello and waits for the welcome, then resets the connection.
func (b *bench) handshakeOnce(hello, buf []byte) error {
	c, err := dial(b.cfg.url, b.cfg.origin, subprotocolV2, handshakeTimeout)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.write(opText, hello); err != nil {
		return err
	}
	c.conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
	return b.awaitWelcome(c, buf)
}

// awaitWelcome reads c's frames until the answer to its hello: nil for a
// welcome, errRefused (counted) for an `error`.
func (b *bench) awaitWelcome(c *client, buf []byte) error {
	var answer error
	answered := false
	onMessage := func(msg []byte) {
		if answered {
			return
		}
		answered, answer = b.answer(msg)
	}
	data := c.pending // frames that came with the 101
	for {
		rest, err := c.frames(data, onMessage)
		if err != nil || answered {
			return firstErr(err, answer)
		}
		n, err := c.conn.Read(buf)
		if err != nil {
			return err
		}
		data = append(rest, buf[:n]...)
	}
}

// answer says whether msg answers a hello, and how.
func (b *bench) answer(msg []byte) (bool, error) {
	switch {
	case bytes.HasPrefix(msg, []byte(welcomePrefix)):
		if len(b.tokens) > 0 && !bytes.Contains(msg, []byte(`"user":"`)) {
			// A server in open mode would not get this far with a token hello; one that
			// did would not be measuring token verification.
			b.surprise("welcome without a user: %.80q", msg)
		}
		return true, nil
	case bytes.HasPrefix(msg, []byte(errorPrefix)):
		var ev struct{ Code, Message string }
		json.Unmarshal(msg, &ev)
		if b.errors.Add(1) <= 3 {
			progress("hello refused: %s: %s", ev.Code, ev.Message)
		}
		return true, errRefused
	default:
		b.surprise("before the welcome: %.80q", msg)
		return false, nil
	}
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func hsTableRow(r hsResult) string {
	return fmt.Sprintf("handshakes concurrency=%d token=%t | handshakes/s=%.0f (%d) | p50=%.2fms p90=%.2fms "+
		"p99=%.2fms max=%.2fms | failures=%d errors=%d unexpected=%d loadgen_cpu=%.0f%%",
		r.Concurrency, r.Token, r.HandshakesPerS, r.Handshakes, r.P50Ms, r.P90Ms, r.P99Ms, r.MaxMs,
		r.Failures, r.Errors, r.Unexpected, r.LoadgenCPUPct)
}
