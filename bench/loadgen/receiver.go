package main

// The receiving side of every client: one goroutine, one epoll set. A
// goroutine per connection costs the generator two reads per wake-up (the
// second one finds nothing) and a scheduler switch; here each ready socket is
// read once per turn. Against the peers the server's core fills first; against
// ours both cores are about as busy (bench/README.md).

import (
	"errors"
	"runtime"
	"syscall"
	"time"
)

const readBufferSize = 256 << 10

func (b *bench) receiveAll() {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fatal("epoll: %v", err)
	}
	byFd := make(map[int32]*client, len(b.conns))
	for _, c := range b.conns {
		c.next = make([]int64, len(b.senders))
		for i := range c.next {
			c.next[i] = 1
		}
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(c.fd)}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
			fatal("epoll add: %v", err)
		}
		byFd[int32(c.fd)] = c
		if len(c.pending) > 0 { // frames that came with the handshake
			b.consume(c, nil, time.Now().UnixNano())
		}
	}
	events := make([]syscall.EpollEvent, 512)
	buf := make([]byte, readBufferSize)
	for !b.stopping.Load() {
		// The senders share this core. Go does not preempt a busy goroutine for 10 ms, nor
		// always take the processor back from one blocked in a system call sooner: a
		// sender's timer would fire late, and that lateness would count as latency. So wait
		// at most 1 ms, and let the scheduler run due senders after every batch.
		runtime.Gosched()
		k, err := syscall.EpollWait(epfd, events, 1)
		if err == syscall.EINTR {
			continue
		} else if err != nil {
			fatal("epoll wait: %v", err)
		}
		for _, ev := range events[:k] {
			c := byFd[ev.Fd]
			if c == nil {
				continue
			}
			if err := b.readOnce(c, &buf); err != nil {
				syscall.EpollCtl(epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
				delete(byFd, ev.Fd)
				if !b.stopping.Load() && b.disconnects.Add(1) <= 3 {
					progress("client %d disconnected: %v", c.id, err)
				}
			}
		}
	}
}

// readOnce reads what one ready socket holds (one read) and accounts every
// message in it; all of them arrived by the time that read returned.
func (b *bench) readOnce(c *client, buf *[]byte) error {
	if len(c.pending) >= len(*buf)/2 { // a frame larger than the buffer is arriving
		*buf = make([]byte, 2*len(*buf)+len(c.pending))
	}
	data := (*buf)[:copy(*buf, c.pending)]
	got, err := syscall.Read(c.fd, (*buf)[len(data):])
	now := time.Now().UnixNano()
	if err == syscall.EAGAIN || err == syscall.EINTR {
		return nil
	}
	if err != nil {
		return err
	}
	if got == 0 {
		return errClosed
	}
	return b.consume(c, (*buf)[:len(data)+got], now)
}

func (b *bench) consume(c *client, data []byte, now int64) error {
	if data == nil {
		data = c.pending
	}
	rest, err := c.frames(data, func(msg []byte) { b.message(c, msg, now) })
	c.pending = append(c.pending[:0], rest...)
	return err
}

var errClosed = errors.New("connection closed by the server")
