package main

// A minimal RFC 6455 client: the handshake, masked frames out, and a parser
// for the server's unmasked frames in. Reading is left to receiver.go, which
// reads every connection from one epoll loop.

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"
)

const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xA
)

var acceptGUID = []byte("258EAFA5-E914-47DA-95CA-C5AB0DC85B11")

type client struct {
	id   int
	conn *net.TCPConn
	fd   int // conn's descriptor, for the receiver's epoll; Go keeps it non-blocking
	mask [4]byte

	wmu  sync.Mutex // a sender's messages and the receiver's pongs share the socket
	wbuf []byte

	// Only the receiver touches these.
	pending   []byte  // the start of a frame the last read cut off
	partial   []byte  // a fragmented message so far
	next      []int64 // next expected sequence number per sender
	seenProbe bool

	// v2: the one room this client is in (set before the receiver starts) and, from its
	// `joined` on, that room's epoch, the next seq expected (0 until joined) and how its
	// messages start, up to "seq":. Socket.IO: the room, and how its messages start, up to
	// the nick (both set before the receiver starts).
	room     []byte
	epoch    []byte
	roomNext int64
	head     []byte
}

// dial opens a TCP connection and performs the client handshake, offering
// subprotocol unless it is empty (then the server must not name one).
func dial(rawURL, origin, subprotocol string, timeout time.Duration) (*client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	nc, err := net.DialTimeout("tcp", u.Host, timeout)
	if err != nil {
		return nil, err
	}
	c := &client{conn: nc.(*net.TCPConn)}
	if err := c.handshake(u, origin, subprotocol, timeout); err != nil {
		nc.Close()
		return nil, err
	}
	raw, err := c.conn.SyscallConn()
	if err != nil {
		nc.Close()
		return nil, err
	}
	raw.Control(func(fd uintptr) { c.fd = int(fd) })
	rand.Read(c.mask[:])
	return c, nil
}

func (c *client) handshake(u *url.URL, origin, subprotocol string, timeout time.Duration) error {
	c.conn.SetDeadline(time.Now().Add(timeout))
	defer c.conn.SetDeadline(time.Time{})
	nonce := make([]byte, 16)
	rand.Read(nonce)
	key := base64.StdEncoding.EncodeToString(nonce)
	req := "GET " + u.RequestURI() + " HTTP/1.1\r\nHost: " + u.Host +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key +
		"\r\nOrigin: " + origin + "\r\n"
	if subprotocol != "" {
		req += "Sec-WebSocket-Protocol: " + subprotocol + "\r\n"
	}
	req += "\r\n"
	if _, err := c.conn.Write([]byte(req)); err != nil {
		return err
	}
	br := bufio.NewReader(c.conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: "GET", URL: u})
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fmt.Errorf("handshake: %s", resp.Status)
	}
	sum := sha1.Sum(append([]byte(key), acceptGUID...))
	if resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		return fmt.Errorf("handshake: bad Sec-WebSocket-Accept")
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != subprotocol {
		return fmt.Errorf("handshake: asked for subprotocol %q, server chose %q", subprotocol, got)
	}
	// Frames the server sent right behind its 101 (history, say) are the first input.
	if n := br.Buffered(); n > 0 {
		first, _ := br.Peek(n)
		c.pending = append([]byte(nil), first...)
	}
	return nil
}

// write sends one masked frame.
func (c *client) write(opcode byte, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b := append(c.wbuf[:0], 0x80|opcode)
	switch n := len(payload); {
	case n < 126:
		b = append(b, 0x80|byte(n))
	case n < 1<<16:
		b = append(b, 0x80|126, byte(n>>8), byte(n))
	default:
		b = append(b, 0x80|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	b = append(b, c.mask[:]...)
	start := len(b)
	b = append(b, payload...)
	for i := range b[start:] {
		b[start+i] ^= c.mask[i&3]
	}
	c.wbuf = b
	_, err := c.conn.Write(b)
	return err
}

// close resets the connection instead of leaving it in TIME_WAIT: thousands of
// runs share the port range.
func (c *client) close() {
	c.conn.SetLinger(0)
	c.conn.Close()
}

// frames calls onMessage for every complete message in data and answers
// pings; it returns the bytes of an incomplete frame at the end, or an error
// for a close frame or a frame a server must not send.
func (c *client) frames(data []byte, onMessage func([]byte)) ([]byte, error) {
	for len(data) >= 2 {
		h0, h1 := data[0], data[1]
		if h1&0x80 != 0 {
			return nil, fmt.Errorf("masked frame from the server")
		}
		size, head := uint64(h1&0x7f), 2
		switch size {
		case 126:
			if len(data) < 4 {
				return data, nil
			}
			size, head = uint64(binary.BigEndian.Uint16(data[2:])), 4
		case 127:
			if len(data) < 10 {
				return data, nil
			}
			size, head = binary.BigEndian.Uint64(data[2:]), 10
		}
		if uint64(len(data)-head) < size {
			return data, nil
		}
		payload := data[head : head+int(size)]
		data = data[head+int(size):]
		fin := h0&0x80 != 0
		switch h0 & 0x0f {
		case opText, opBinary, opContinuation:
			if !fin || len(c.partial) > 0 {
				c.partial = append(c.partial, payload...)
				if !fin {
					continue
				}
				payload, c.partial = c.partial, c.partial[:0]
			}
			onMessage(payload)
		case opPing:
			if err := c.write(opPong, payload); err != nil {
				return nil, err
			}
		case opClose:
			if len(payload) < 2 {
				return nil, fmt.Errorf("close frame without a code")
			}
			return nil, fmt.Errorf("close %d %q", binary.BigEndian.Uint16(payload), payload[2:])
		case opPong:
		default:
			return nil, fmt.Errorf("unknown opcode %#x", h0&0x0f)
		}
	}
	return data, nil
}
