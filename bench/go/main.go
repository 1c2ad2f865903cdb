// Command gokernel is the original Go system's image kernel, kept as a benchmark reference:
// decode, Lanczos resize to a target width with github.com/disintegration/imaging, convert to
// grayscale, encode. It reports per-file timings as JSON.
//
// With file paths as arguments it renders each once and prints one JSON line per file.
// Without arguments it speaks the batch protocol of bench/kernel_child.py on stdin/stdout:
// paths one per line, an empty line ends a batch; it answers "ready", waits for "go", then
// prints one JSON line for the batch.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"image"
	"image/jpeg"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/disintegration/imaging"
)

type imageResult struct {
	File     string  `json:"file"`
	OK       bool    `json:"ok"`
	Error    *string `json:"error"`
	OutBytes int     `json:"out_bytes"`
	WallS    float64 `json:"wall_s"`
	CPUS     float64 `json:"cpu_s"`
}

type batchResult struct {
	WallS  float64       `json:"wall_s"`
	CPUS   float64       `json:"cpu_s"`
	Images []imageResult `json:"images"`
}

var (
	targetWidth  = flag.Int("width", 800, "target width in pixels (never upscales)")
	outputFormat = flag.String("format", "png", "output format: png or jpeg")
)

// processCPUSeconds is user+system CPU time of the whole process, like Python's process_time.
func processCPUSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

func render(data []byte) ([]byte, error) {
	img, err := imaging.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	var resized image.Image = img
	if img.Bounds().Dx() > *targetWidth {
		resized = imaging.Resize(img, *targetWidth, 0, imaging.Lanczos)
	}
	gray := imaging.Grayscale(resized)
	var out bytes.Buffer
	if *outputFormat == "jpeg" {
		err = jpeg.Encode(&out, gray, &jpeg.Options{Quality: 85})
	} else {
		err = png.Encode(&out, gray)
	}
	return out.Bytes(), err
}

func renderOne(path string, data []byte, readErr error) imageResult {
	wallStart, cpuStart := time.Now(), processCPUSeconds()
	result := imageResult{File: path}
	err := readErr
	if err == nil {
		var out []byte
		out, err = render(data)
		result.OutBytes = len(out)
	}
	if err != nil {
		message := err.Error()
		result.Error = &message
		result.OutBytes = 0
	} else {
		result.OK = true
	}
	result.WallS = time.Since(wallStart).Seconds()
	result.CPUS = processCPUSeconds() - cpuStart
	return result
}

func runBatch(paths []string, warmed map[string]bool, in *bufio.Reader, out *bufio.Writer) error {
	contents := make([][]byte, len(paths))
	readErrs := make([]error, len(paths))
	for i, path := range paths {
		contents[i], readErrs[i] = os.ReadFile(path)
	}
	// Warm up once per file type seen for the first time, untimed, like bench/kernel_child.py.
	for i, path := range paths {
		suffix := strings.ToLower(filepath.Ext(path))
		if !warmed[suffix] && renderOne(path, contents[i], readErrs[i]).OK {
			warmed[suffix] = true
		}
	}
	fmt.Fprintln(out, "ready")
	out.Flush()
	line, err := in.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "go" {
		return fmt.Errorf("expected 'go' from the parent, got %q", line)
	}
	wallStart, cpuStart := time.Now(), processCPUSeconds()
	batch := batchResult{Images: make([]imageResult, 0, len(paths))}
	for i, path := range paths {
		batch.Images = append(batch.Images, renderOne(path, contents[i], readErrs[i]))
	}
	batch.WallS = time.Since(wallStart).Seconds()
	batch.CPUS = processCPUSeconds() - cpuStart
	encoded, _ := json.Marshal(batch)
	fmt.Fprintln(out, string(encoded))
	return out.Flush()
}

func readBatch(in *bufio.Reader) ([]string, bool) {
	var paths []string
	for {
		line, err := in.ReadString('\n')
		trimmed := strings.TrimSpace(line)
		if trimmed == "" && (err == nil || len(paths) > 0) {
			return paths, true
		}
		if trimmed != "" {
			paths = append(paths, trimmed)
		}
		if err != nil {
			return paths, len(paths) > 0
		}
	}
}

func main() {
	flag.Parse()
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	if flag.NArg() > 0 {
		for _, path := range flag.Args() {
			data, err := os.ReadFile(path)
			encoded, _ := json.Marshal(renderOne(path, data, err))
			fmt.Fprintln(out, string(encoded))
		}
		return
	}
	in := bufio.NewReader(os.Stdin)
	warmed := map[string]bool{}
	for {
		paths, more := readBatch(in)
		if !more {
			return
		}
		if err := runBatch(paths, warmed, in, out); err != nil {
			fmt.Fprintln(os.Stderr, "gokernel:", err)
			os.Exit(2)
		}
	}
}
