// Command loadgen is the chat benchmark's load generator.
//
// It opens -clients WebSocket connections to a broadcast chat server (ramping
// with bounded concurrency), waits until every one is registered (client 0
// broadcasts "hello <n>" probes until every client has received one), then
// lets the first -senders clients send "b <sender> <seq> <unixnanos>" for
// -duration, either as fast as possible (open loop), at a fixed total -rate,
// or in a closed loop where message q is sent only after every client has
// received message q-window. Every client checks per-sender order and gaps
// and records end-to-end latency. It prints one table line, or one JSON line
// with -json (the table line then goes to stderr). Progress lines starting
// with "# " go to stderr; "# sending" and "# sent" bracket the send phase.
//
// With -v2 the clients speak the chat's v2 protocol (subprotocol chat.v2,
// JSON; v2.go): each says hello and joins one of -rooms rooms (client i room
// "r<i mod rooms>", or "lobby" when there is one room) before the probes,
// which then go to every room. Senders send the same text in a `say`, and
// every client also checks its room's seq for gaps and reorders. A sender's
// closed-loop window counts the clients of its room only.
//
// With -sio the clients speak Socket.IO 5 over Engine.IO 4's WebSocket
// transport (sio.go) to a server with the same two events, join and say:
// each joins its room the same way, senders send the same text, and every
// client checks each sender's order and gaps as in v1 (Socket.IO numbers no
// room). -url then names the Engine.IO endpoint,
// ws://HOST/socket.io/?EIO=4&transport=websocket.
//
// With -tokens FILE (v2, or -handshakes) client i says hello with the JWT on
// line i of FILE instead of a nick, for a server in token mode
// (CHAT_AUTH=token); the file needs a line per client.
//
// With -handshakes it measures something else (handshake.go): -concurrency
// goroutines each dial, say hello (v2: a nick, or with -tokens the token of
// its own line) and wait for the welcome, then reset the connection and start
// over, for -duration; it prints handshakes per second and their latency from
// the dial to the welcome, bracketed by the same "# sending" and "# sent".
//
// It uses the standard library only: ws.go is a minimal WebSocket client and
// receiver.go reads every connection from one epoll loop: no goroutine,
// allocation or clock read per message.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math/bits"
	"net/url"
	"os"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	ring         = 4096            // per-sender slots for closed-loop delivery counts
	stallTimeout = 5 * time.Second // closed loop: give up waiting for a lagging window
	subBits      = 7               // latency histogram: 128 sub-buckets per power of two
	nBuckets     = (64 - subBits + 1) << subBits
	// SO_SNDBUF of a sending client (the kernel doubles it).
	senderWriteBuffer = 16 << 10
)

type config struct {
	url, origin             string
	clients, senders, ramp  int
	duration, settle, drain time.Duration
	rate                    float64
	window                  int64
	v2, sio                 bool
	rooms                   int
	tokens                  string // a file of JWTs, one a line: client i's hello carries line i
	handshakes              bool
	concurrency             int // handshake mode: dials in flight
	jsonOut                 bool
	cpuProfile              string
}

// sender holds one sending client's counters; acks[q%ring] counts the clients
// that have received (or skipped past) message q, out of members.
type sender struct {
	conn     *client
	members  int64 // clients that receive its messages: all of them, or (v2) its room's
	sent     int64
	acks     [ring]atomic.Int32
	complete atomic.Int64 // highest q that every client has received or skipped
	notify   chan struct{}
}

// result is what one run prints, as a table line or a JSON line.
type result struct {
	URL             string  `json:"url"`
	Clients         int     `json:"clients"`
	Senders         int     `json:"senders"`
	DurationS       float64 `json:"duration_s"`
	Rate            float64 `json:"rate"`
	Window          int64   `json:"window"`
	Connected       int64   `json:"connected"`
	ConnectFailures int     `json:"connect_failures"`
	ConnectS        float64 `json:"connect_s"`
	Disconnects     int64   `json:"disconnects"`
	SendErrors      int64   `json:"send_errors"`
	Stalls          int64   `json:"stalls"` // closed loop: waits for a window that gave up after stallTimeout
	Sent            int64   `json:"sent"`
	Expected        int64   `json:"expected"` // sent * connected
	Delivered       int64   `json:"delivered"`
	DeliveredPerS   float64 `json:"delivered_per_s"` // deliveries during the send phase / its length
	Loss            int64   `json:"loss"`            // expected - delivered, after the drain
	LossPct         float64 `json:"loss_pct"`
	Gaps            int64   `json:"gaps"`     // messages skipped in a client's per-sender sequence
	Reorders        int64   `json:"reorders"` // messages older than one already seen
	P50Ms           float64 `json:"p50_ms"`
	P90Ms           float64 `json:"p90_ms"`
	P99Ms           float64 `json:"p99_ms"`
	MaxMs           float64 `json:"max_ms"`
	LoadgenCPUPct   float64 `json:"loadgen_cpu_pct"` // this process, during the send phase
	// v2 and Socket.IO only.
	V2         bool  `json:"v2,omitempty"`
	SocketIO   bool  `json:"socketio,omitempty"`
	Rooms      int   `json:"rooms,omitempty"`
	Acks       int64 `json:"acks,omitempty"`       // v2: `ack` events the senders (and the prober) got
	Errors     int64 `json:"errors,omitempty"`     // v2: `error` events; Socket.IO: CONNECT_ERROR packets
	Unexpected int64 `json:"unexpected,omitempty"` // a message of another room or epoch, a second `joined`, a frame that is no event
	Pings      int64 `json:"pings,omitempty"`      // Socket.IO: the server's Engine.IO pings, each answered with a pong
}

type bench struct {
	cfg                     config
	tokens                  []string // -tokens, read
	conns                   []*client
	senders                 []*sender
	registered, joined      atomic.Int64
	nsConnected, pings      atomic.Int64 // Socket.IO: clients connected to the namespace; pings answered
	acks, errors            atomic.Int64
	unexpected              atomic.Int64
	delivered, inWindow     atomic.Int64
	gaps, reorders          atomic.Int64
	disconnects, sendErrors atomic.Int64
	stalls                  atomic.Int64
	maxLatency              atomic.Int64 // nanoseconds
	sendEnd                 atomic.Int64 // unix nanos; 0 while sending
	stopping                atomic.Bool
	hist                    [nBuckets]atomic.Uint64 // microseconds, log-linear
}

func main() {
	var cfg config
	flag.StringVar(&cfg.url, "url", "ws://127.0.0.1:8080/ws", "WebSocket URL")
	flag.StringVar(&cfg.origin, "origin", "", "Origin header (default: http://host of -url)")
	flag.IntVar(&cfg.clients, "clients", 100, "connections to open")
	flag.IntVar(&cfg.senders, "senders", 10, "how many of the clients send")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "send phase length")
	flag.Float64Var(&cfg.rate, "rate", 0, "total messages/s over all senders (0 = as fast as possible)")
	flag.Int64Var(&cfg.window, "window", 0, "closed loop: send q only after every client got q-window (0 = off)")
	flag.BoolVar(&cfg.v2, "v2", false, "speak the v2 protocol (subprotocol chat.v2): hello, join, say")
	flag.BoolVar(&cfg.sio, "sio", false, "speak Socket.IO 5 over Engine.IO 4 (WebSocket transport): join, say")
	flag.IntVar(&cfg.rooms, "rooms", 1, "v2, Socket.IO: rooms; client i joins r<i mod rooms> (one room: lobby)")
	flag.StringVar(&cfg.tokens, "tokens", "", "v2, -handshakes: a file of JWTs, one a line: client i says hello with line i (CHAT_AUTH=token)")
	flag.BoolVar(&cfg.handshakes, "handshakes", false,
		"measure handshakes instead: dial, v2 hello, welcome, reset, over and over for -duration")
	flag.IntVar(&cfg.concurrency, "concurrency", 32, "handshake mode: handshakes in flight (one goroutine each)")
	flag.IntVar(&cfg.ramp, "ramp", 200, "concurrent connection attempts")
	flag.DurationVar(&cfg.settle, "settle", 60*time.Second, "max wait for all clients to be registered")
	flag.DurationVar(&cfg.drain, "drain", 10*time.Second, "max wait for in-flight messages after sending")
	flag.BoolVar(&cfg.jsonOut, "json", false, "print a JSON line (table line goes to stderr)")
	flag.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of the send phase to this file (go tool pprof)")
	flag.Parse()
	if cfg.origin == "" {
		u, err := url.Parse(cfg.url)
		if err != nil {
			fatal("bad -url: %v", err)
		}
		cfg.origin = "http://" + u.Host
	}
	if cfg.handshakes {
		runHandshakes(cfg)
		return
	}
	if cfg.senders > cfg.clients || cfg.window >= ring || cfg.clients < 1 {
		fatal("need 1 <= clients, senders <= clients, window < %d", ring)
	}
	if cfg.v2 && cfg.sio {
		fatal("-v2 or -sio, not both")
	}
	if cfg.rooms < 1 || cfg.rooms > cfg.clients || (cfg.rooms > 1 && !cfg.roomed()) {
		fatal("need 1 <= rooms <= clients, and -v2 or -sio for more than one room")
	}
	if cfg.tokens != "" && !cfg.v2 {
		fatal("-tokens needs -v2")
	}
	raiseFileLimit(uint64(cfg.clients) + 100)
	b := &bench{cfg: cfg}
	if cfg.tokens != "" {
		b.tokens = readTokens(cfg.tokens, cfg.clients)
	}
	res := b.run()
	report(cfg, res, tableRow(res))
}

// runHandshakes runs handshake mode (handshake.go): v2 whatever -v2 says, since it is the
// v2 hello that is measured.
func runHandshakes(cfg config) {
	if cfg.sio || cfg.concurrency < 1 {
		fatal("-handshakes: need -concurrency >= 1, and not -sio")
	}
	raiseFileLimit(uint64(cfg.concurrency) + 100)
	b := &bench{cfg: cfg}
	if cfg.tokens != "" {
		b.tokens = readTokens(cfg.tokens, cfg.concurrency)
	}
	res := b.handshakes()
	report(cfg, res, hsTableRow(res))
}

// report prints a run's table line, or with -json its JSON line (and the table line to stderr).
func report(cfg config, res any, row string) {
	if cfg.jsonOut {
		fmt.Fprintln(os.Stderr, row)
		out, _ := json.Marshal(res)
		fmt.Println(string(out))
	} else {
		fmt.Println(row)
	}
}

func (b *bench) run() result {
	cfg := b.cfg
	t0 := time.Now()
	failures, firstErr := b.connect()
	connectTime := time.Since(t0)
	n := int64(len(b.conns))
	if n == 0 {
		fatal("no connection succeeded: %v", firstErr)
	}
	if failures > 0 {
		progress("%d connect failures, first: %v", failures, firstErr)
	}
	if cfg.roomed() {
		b.assignRooms()
	}
	for i := 0; i < cfg.senders && i < len(b.conns); i++ {
		// A message's latency starts when its sender writes it: keep the sender's own kernel
		// queue short (Linux grows it to megabytes), so what is measured is the server's.
		b.conns[i].conn.SetWriteBuffer(senderWriteBuffer)
		s := &sender{conn: b.conns[i], members: n, notify: make(chan struct{}, 1)}
		if cfg.roomed() {
			s.members = b.roomSize(i)
		}
		b.senders = append(b.senders, s)
	}
	go b.receiveAll()
	if cfg.sio {
		b.connectNamespace(n)
	}
	if cfg.roomed() {
		b.joinAll(n)
	}
	b.register(n)

	progress("sending")
	if cfg.cpuProfile != "" { // to check where the generator's own core goes
		f, err := os.Create(cfg.cpuProfile)
		if err != nil {
			fatal("-cpuprofile: %v", err)
		}
		pprof.StartCPUProfile(f)
	}
	cpu0, start := cpuTime(), time.Now()
	var wg sync.WaitGroup
	for i, s := range b.senders {
		wg.Add(1)
		go func(i int, s *sender) { defer wg.Done(); b.send(i, s, start) }(i, s)
	}
	wg.Wait()
	time.Sleep(time.Until(start.Add(cfg.duration))) // with no senders: hold the connections
	end := time.Now()
	b.sendEnd.Store(end.UnixNano())
	pprof.StopCPUProfile()
	cpu1 := cpuTime()
	progress("sent")

	var sent, expected int64
	for _, s := range b.senders {
		sent += s.sent
		expected += s.sent * s.members
	}
	b.waitDrain(expected)
	b.stopping.Store(true)
	for _, c := range b.conns {
		c.close()
	}

	r := result{
		URL: cfg.url, Clients: cfg.clients, Senders: cfg.senders, DurationS: cfg.duration.Seconds(),
		Rate: cfg.rate, Window: cfg.window, Connected: n, ConnectFailures: failures,
		ConnectS: round(connectTime.Seconds()), Disconnects: b.disconnects.Load(),
		SendErrors: b.sendErrors.Load(), Stalls: b.stalls.Load(), Sent: sent, Expected: expected,
		Delivered: b.delivered.Load(), Gaps: b.gaps.Load(), Reorders: b.reorders.Load(),
		P50Ms: b.percentile(0.50), P90Ms: b.percentile(0.90), P99Ms: b.percentile(0.99),
		MaxMs: round(float64(b.maxLatency.Load()) / 1e6),
	}
	if cfg.roomed() {
		r.V2, r.SocketIO, r.Rooms = cfg.v2, cfg.sio, cfg.rooms
		r.Acks, r.Errors, r.Unexpected = b.acks.Load(), b.errors.Load(), b.unexpected.Load()
		r.Pings = b.pings.Load()
	}
	wall := end.Sub(start).Seconds()
	r.DeliveredPerS = round(float64(b.inWindow.Load()) / wall)
	r.LoadgenCPUPct = round(100 * (cpu1 - cpu0).Seconds() / wall)
	r.Loss = expected - r.Delivered
	if expected > 0 {
		r.LossPct = round(100 * float64(r.Loss) / float64(expected))
	}
	return r
}

// connect dials all clients with at most cfg.ramp handshakes in flight.
func (b *bench) connect() (failures int, firstErr error) {
	conns := make([]*client, b.cfg.clients)
	errs := make([]error, b.cfg.clients)
	sem := make(chan struct{}, b.cfg.ramp)
	subprotocol := ""
	if b.cfg.v2 {
		subprotocol = subprotocolV2
	}
	var wg sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			conns[i], errs[i] = dial(b.cfg.url, b.cfg.origin, subprotocol, 10*time.Second)
		}(i)
		if (i+1)%1000 == 0 {
			progress("dialed %d", i+1)
		}
	}
	wg.Wait()
	for i, c := range conns {
		if c != nil {
			c.id = len(b.conns)
			b.conns = append(b.conns, c)
		} else if failures++; firstErr == nil {
			firstErr = errs[i]
		}
	}
	return failures, firstErr
}

// register broadcasts probes from client 0 (v2: into every room, from its
// first client) until all n clients got one.
func (b *bench) register(n int64) {
	deadline := time.Now().Add(b.cfg.settle)
	for probe := 1; b.registered.Load() < n; probe++ {
		if time.Now().After(deadline) {
			fatal("only %d of %d clients registered after %v", b.registered.Load(), n, b.cfg.settle)
		}
		if b.cfg.roomed() {
			b.probeRooms(probe)
		} else if err := b.conns[0].write(opText, []byte("hello "+strconv.Itoa(probe))); err != nil {
			fatal("probe: %v", err)
		}
		for wait := time.Now().Add(time.Second); time.Now().Before(wait) && b.registered.Load() < n; {
			time.Sleep(10 * time.Millisecond)
		}
		progress("registered %d/%d", b.registered.Load(), n)
	}
}

func (b *bench) send(id int, s *sender, start time.Time) {
	end := start.Add(b.cfg.duration)
	s.conn.conn.SetWriteDeadline(end.Add(5 * time.Second))
	var interval time.Duration
	next := start
	if b.cfg.rate > 0 {
		interval = time.Duration(float64(len(b.senders)) / b.cfg.rate * 1e9)
		next = start.Add(interval * time.Duration(id) / time.Duration(len(b.senders)))
	}
	buf := make([]byte, 0, 64)
	for q := int64(1); ; q++ {
		stamp := time.Now()
		if interval > 0 {
			time.Sleep(time.Until(next))
			stamp, next = next, next.Add(interval) // scheduled time: no coordinated omission
		}
		if b.cfg.window > 0 {
			b.waitWindow(s, q-b.cfg.window, end)
			stamp = time.Now()
		}
		if !stamp.Before(end) || !time.Now().Before(end) {
			return
		}
		s.acks[q%ring].Store(0)
		buf = buf[:0]
		if b.cfg.v2 {
			buf = append(buf, `{"type":"say","room":"`...)
			buf = append(buf, s.conn.room...)
			buf = append(buf, `","text":"`...)
		} else if b.cfg.sio {
			buf = append(buf, sioSay...)
			buf = append(buf, s.conn.room...)
			buf = append(buf, `","text":"`...)
		}
		buf = append(buf, "b "...)
		buf = strconv.AppendInt(buf, int64(id), 10)
		buf = append(buf, ' ')
		buf = strconv.AppendInt(buf, q, 10)
		buf = append(buf, ' ')
		buf = strconv.AppendInt(buf, stamp.UnixNano(), 10)
		if b.cfg.v2 {
			buf = appendID(append(buf, `","ref":"`...), uint64(q), uint64(id)+2) // (a page's ref: 16 hex digits)
			buf = append(buf, `"}`...)
		} else if b.cfg.sio {
			buf = append(buf, `"}]`...)
		}
		if err := s.conn.write(opText, buf); err != nil {
			b.sendErrors.Add(1)
			return
		}
		s.sent++
	}
}

// waitWindow blocks until every client has message q (or skipped past it),
// the send phase ends, or stallTimeout passes (counted as a stall).
func (b *bench) waitWindow(s *sender, q int64, end time.Time) {
	stalled := time.Now().Add(stallTimeout)
	deadline := end
	if stalled.Before(end) {
		deadline = stalled
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for s.complete.Load() < q {
		select {
		case <-s.notify:
		case <-timer.C:
			if deadline == stalled {
				b.stalls.Add(1)
			}
			return
		}
	}
}

// message accounts one message a client received.
func (b *bench) message(c *client, data []byte, now int64) {
	if b.cfg.v2 {
		b.event(c, data, now)
		return
	}
	if b.cfg.sio {
		b.packet(c, data, now)
		return
	}
	for len(data) > 0 { // a server may batch messages into one frame, newline-separated
		var line []byte
		line, data, _ = bytes.Cut(data, []byte{'\n'})
		b.line(c, line, now)
	}
}

// line accounts one chat line: a probe or a "b <sender> <seq> <unixnanos>" message.
func (b *bench) line(c *client, line []byte, now int64) {
	if !bytes.HasPrefix(line, []byte("hello ")) {
		b.deliver(line, c.next, now)
	} else if !c.seenProbe {
		c.seenProbe = true
		b.registered.Add(1)
	}
}

// deliver accounts one received "b <sender> <seq> <unixnanos>" message.
func (b *bench) deliver(line []byte, next []int64, now int64) {
	v, ok := parseBench(line)
	id, q, sentAt := int(v[0]), v[1], v[2]
	if !ok || id >= len(next) {
		return
	}
	b.delivered.Add(1)
	if end := b.sendEnd.Load(); end == 0 || now <= end {
		b.inWindow.Add(1)
	}
	b.record(now - sentAt)
	exp := next[id]
	if q < exp {
		b.reorders.Add(1)
		return
	}
	if q > exp {
		b.gaps.Add(q - exp)
	}
	next[id] = q + 1
	if b.cfg.window == 0 {
		return
	}
	s := b.senders[id]
	for k := exp; k <= q; k++ {
		if int64(s.acks[k%ring].Add(1)) == s.members {
			for old := s.complete.Load(); k > old && !s.complete.CompareAndSwap(old, k); old = s.complete.Load() {
			}
			select {
			case s.notify <- struct{}{}:
			default:
			}
		}
	}
}

// parseBench parses "b <sender> <seq> <unixnanos>" without allocating.
func parseBench(line []byte) (v [3]int64, ok bool) {
	if len(line) < 2 || line[0] != 'b' {
		return v, false
	}
	i := 1
	for k := range v {
		if i >= len(line) || line[i] != ' ' {
			return v, false
		}
		n := 0
		v[k], n = digits(line[i+1:])
		if n == 0 {
			return v, false
		}
		i += 1 + n
	}
	return v, i == len(line)
}

// digits reads the decimal number b starts with: its value and how many digits it has (0:
// none). It indexes instead of reslicing: this runs for every message the generator reads.
func digits(b []byte) (v int64, n int) {
	for ; n < len(b); n++ {
		d := b[n] - '0'
		if d > 9 {
			break
		}
		v = v*10 + int64(d)
	}
	return v, n
}

func (b *bench) waitDrain(expected int64) {
	deadline := time.Now().Add(b.cfg.drain)
	last, lastChange := b.delivered.Load(), time.Now()
	for b.delivered.Load() < expected && time.Now().Before(deadline) && time.Since(lastChange) < 2*time.Second {
		time.Sleep(20 * time.Millisecond)
		if d := b.delivered.Load(); d != last {
			last, lastChange = d, time.Now()
		}
	}
}

func (b *bench) record(ns int64) {
	if ns < 0 {
		ns = 0
	}
	for old := b.maxLatency.Load(); ns > old && !b.maxLatency.CompareAndSwap(old, ns); old = b.maxLatency.Load() {
	}
	b.hist[bucket(uint64(ns/1000))].Add(1)
}

// bucket maps microseconds to a log-linear bucket (< 1% relative error).
func bucket(us uint64) int {
	if us < 1<<(subBits+1) {
		return int(us)
	}
	e := bits.Len64(us) - 1 - subBits
	return e<<subBits + int(us>>e)
}

// lowerBound is the smallest microsecond value that falls in bucket i.
func lowerBound(i int) uint64 {
	if i < 1<<(subBits+1) {
		return uint64(i)
	}
	e := i>>subBits - 1
	return uint64(i-e<<subBits) << e
}

func (b *bench) percentile(p float64) float64 {
	var total uint64
	for i := range b.hist {
		total += b.hist[i].Load()
	}
	if total == 0 {
		return 0
	}
	rank, seen := uint64(p*float64(total-1))+1, uint64(0)
	for i := range b.hist {
		if seen += b.hist[i].Load(); seen >= rank {
			return round(float64(lowerBound(i)) / 1000)
		}
	}
	return 0
}

func tableRow(r result) string {
	row := fmt.Sprintf("clients=%d senders=%d rate=%g window=%d | delivered/s=%.0f loss=%d (%.2f%%) gaps=%d reorders=%d | "+
		"p50=%.2fms p90=%.2fms p99=%.2fms max=%.2fms | connect_failures=%d disconnects=%d stalls=%d loadgen_cpu=%.0f%%",
		r.Clients, r.Senders, r.Rate, r.Window, r.DeliveredPerS, r.Loss, r.LossPct, r.Gaps, r.Reorders,
		r.P50Ms, r.P90Ms, r.P99Ms, r.MaxMs, r.ConnectFailures, r.Disconnects, r.Stalls, r.LoadgenCPUPct)
	if r.V2 {
		row += fmt.Sprintf(" | v2 rooms=%d acks=%d errors=%d unexpected=%d", r.Rooms, r.Acks, r.Errors, r.Unexpected)
	}
	if r.SocketIO {
		row += fmt.Sprintf(" | socketio rooms=%d pings=%d errors=%d unexpected=%d", r.Rooms, r.Pings, r.Errors, r.Unexpected)
	}
	return row
}

// roomed: the clients join rooms (v2 or Socket.IO).
func (cfg config) roomed() bool { return cfg.v2 || cfg.sio }

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// raiseFileLimit lifts RLIMIT_NOFILE to need (root may raise the hard limit),
// or as far as the hard limit allows.
func raiseFileLimit(need uint64) {
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	if lim.Cur >= need {
		return
	}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: need, Max: max(need, lim.Max)}) != nil {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

func max(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

func round(x float64) float64 { return float64(int64(x*1000+0.5)) / 1000 }

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "# "+format+"\n", args...)
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(1)
}
