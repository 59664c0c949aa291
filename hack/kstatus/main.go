// kstatus reads a JSON array of Kubernetes objects on stdin and prints, for each, what
// sigs.k8s.io/cli-utils' kstatus (the library Flux, kpt and cli-utils' apply use) computes:
// a JSON array of {"status": ..., "message": ...}. The operator's tests hold Phi3Model statuses to it.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	// utiljson, as client-go decodes: whole numbers become int64, which kstatus's accessors expect.
	var objects []map[string]interface{}
	data, err := io.ReadAll(os.Stdin)
	if err == nil {
		err = utiljson.Unmarshal(data, &objects)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading objects:", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(objects))
	for _, object := range objects {
		computed, err := status.Compute(&unstructured.Unstructured{Object: object})
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: computing status:", err)
			os.Exit(1)
		}
		results = append(results, result{Status: computed.Status.String(), Message: computed.Message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		os.Exit(1)
	}
}
