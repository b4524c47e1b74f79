package workerpool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// Map runs fn over inputs with at most `workers` goroutines and returns the
// results in input order. The first error cancels the remaining work.
func Map[In, Out any](ctx context.Context, inputs []In, workers int,
	fn func(context.Context, In) (Out, error)) ([]Out, error) {

	if workers < 1 {
		return nil, errors.New("workers must be >= 1")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	results := make([]Out, len(inputs))
	jobs := make(chan int)
	var (
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)

	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				out, err := fn(ctx, inputs[i])
				if err != nil {
					once.Do(func() {
						firstErr = fmt.Errorf("input %d: %w", i, err)
						cancel()
					})
					continue
				}
				results[i] = out
			}
		}()
	}

feed:
	for i := range inputs {
		select {
		case jobs <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()

	if firstErr != nil {
		return nil, firstErr
	}
	return results, ctx.Err()
}

// ---- tests

func TestMapKeepsOrder(t *testing.T) {
	in := []int{5, 1, 4, 2, 3}
	out, err := Map(context.Background(), in, 3, func(_ context.Context, n int) (int, error) {
		time.Sleep(time.Duration(n) * time.Millisecond)
		return n * n, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []int{25, 1, 16, 4, 9}
	for i := range want {
		if out[i] != want[i] {
			t.Fatalf("out[%d] = %d, want %d", i, out[i], want[i])
		}
	}
}

func TestMapStopsOnError(t *testing.T) {
	var mu sync.Mutex
	started := 0
	_, err := Map(context.Background(), make([]int, 100), 2, func(ctx context.Context, _ int) (int, error) {
		mu.Lock()
		started++
		n := started
		mu.Unlock()
		if n == 3 {
			return 0, errors.New("boom")
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(time.Millisecond):
			return 1, nil
		}
	})
	if err == nil || started >= 100 {
		t.Fatalf("err=%v started=%d: expected early stop", err, started)
	}
}
