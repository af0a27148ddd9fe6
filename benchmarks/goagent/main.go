// Command goagent serves the SPIRE agent's Delegated Identity API on grpc-go, the transport
// of a real SPIRE agent, for `just bench --agent go`.
//
//	goagent ADMIN_SOCKET SVID_TTL
//
// The dev agent (benchmarks/agent_process.py) is one Python event loop: after a rotation it
// answers 1,000 streams one after another, and a new subscription waits behind them. A real
// agent answers each stream from its own goroutine, on every core, through grpc-go's HTTP/2
// writer. This stand-in does the same with the least work of its own: every workload gets
// spiffe://example.org/ns/<ns>/sa/<sa> from its k8s selectors, an ECDSA P-256 X.509-SVID
// signed by one CA, cached per SPIFFE ID as the agent caches it. It speaks the same
// line protocol on stdin as agent_process.py (ready; rotate [SPIFFE_ID];
// rotate_gradually TTL; stats). JWT-SVIDs are ES256, signed by a key of their own that the
// JWT bundle lists. Benchmark code, never shipped.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	di "benchagent/pb/delegatedidentity"
	types "benchagent/pb/types"
)

const trustDomain = "example.org"

type svid struct {
	chain   [][]byte
	key     []byte
	expires int64
	gen     uint64
}

type agent struct {
	di.UnimplementedDelegatedIdentityServer

	caKey  *ecdsa.PrivateKey
	ca     *x509.Certificate
	jwtKey *ecdsa.PrivateKey

	mu      sync.Mutex
	ttl     time.Duration
	gen     uint64
	svids   map[string]*svid
	subs    map[chan struct{}]struct{}
	opened  int
	answers []float64
}

func newAgent(ttl time.Duration) (*agent, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	id, _ := url.Parse("spiffe://" + trustDomain)
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Country: []string{"US"}, Organization: []string{"SPIFFE"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{id},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	jwtKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return &agent{
		caKey: key, ca: ca, jwtKey: jwtKey, ttl: ttl,
		svids: map[string]*svid{}, subs: map[chan struct{}]struct{}{},
	}, nil
}

// issue signs a new SVID for id, valid ttl.
func (a *agent) issue(id string, ttl time.Duration) (*svid, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	uri, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{Country: []string{"US"}, Organization: []string{"SPIRE"}},
		NotBefore:    now.Add(-10 * time.Second),
		NotAfter:     now.Add(ttl),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment |
			x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{uri},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, a.ca, &key.PublicKey, a.caKey)
	if err != nil {
		return nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &svid{chain: [][]byte{der}, key: pkcs8, expires: template.NotAfter.Unix()}, nil
}

// current is id's cached SVID, issued on first use.
func (a *agent) current(id string) (*svid, error) {
	a.mu.Lock()
	found, ttl := a.svids[id], a.ttl
	a.mu.Unlock()
	if found != nil {
		return found, nil
	}
	fresh, err := a.issue(id, ttl)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if found = a.svids[id]; found != nil { // another stream issued it meanwhile
		return found, nil
	}
	a.gen++
	fresh.gen = a.gen
	a.svids[id] = fresh
	return fresh, nil
}

// rotate re-issues every cached SVID (only id's if not empty), then wakes every stream.
func (a *agent) rotate(id string, ttl time.Duration) error {
	a.mu.Lock()
	if ttl > 0 {
		a.ttl = ttl
	}
	ttl = a.ttl
	var ids []string
	for cached := range a.svids {
		if id == "" || cached == id {
			ids = append(ids, cached)
		}
	}
	a.mu.Unlock()
	fresh := make(map[string]*svid, len(ids))
	for _, cached := range ids {
		issued, err := a.issue(cached, ttl)
		if err != nil {
			return err
		}
		fresh[cached] = issued
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for cached, issued := range fresh {
		a.gen++
		issued.gen = a.gen
		a.svids[cached] = issued
	}
	for wake := range a.subs {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	return nil
}

func workloadID(selectors []*types.Selector) (string, error) {
	var ns, sa string
	for _, s := range selectors {
		if s.Type != "k8s" {
			continue
		}
		if v := strings.TrimPrefix(s.Value, "ns:"); v != s.Value {
			ns = v
		} else if v := strings.TrimPrefix(s.Value, "sa:"); v != s.Value {
			sa = v
		}
	}
	if ns == "" || sa == "" {
		return "", fmt.Errorf("no k8s ns and sa selectors")
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, ns, sa), nil
}

func (a *agent) SubscribeToX509SVIDs(
	req *di.SubscribeToX509SVIDsRequest, stream di.DelegatedIdentity_SubscribeToX509SVIDsServer,
) error {
	started := time.Now()
	id, err := workloadID(req.Selectors)
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	wake := make(chan struct{}, 1)
	a.mu.Lock()
	a.subs[wake] = struct{}{}
	a.opened++
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.subs, wake)
		a.mu.Unlock()
	}()
	path := strings.TrimPrefix(id, "spiffe://"+trustDomain)
	var sent uint64
	for {
		current, err := a.current(id)
		if err != nil {
			return status.Error(codes.Internal, err.Error())
		}
		if current.gen != sent {
			err := stream.Send(&di.SubscribeToX509SVIDsResponse{
				X509Svids: []*di.X509SVIDWithKey{{
					X509Svid: &types.X509SVID{
						CertChain: current.chain,
						Id:        &types.SPIFFEID{TrustDomain: trustDomain, Path: path},
						ExpiresAt: current.expires,
					},
					X509SvidKey: current.key,
				}},
			})
			if err != nil {
				return err
			}
			if sent == 0 {
				a.mu.Lock()
				a.answers = append(a.answers, time.Since(started).Seconds())
				a.mu.Unlock()
			}
			sent = current.gen
		}
		select {
		case <-wake:
		case <-stream.Context().Done():
			return nil
		}
	}
}

func (a *agent) SubscribeToX509Bundles(
	req *di.SubscribeToX509BundlesRequest, stream di.DelegatedIdentity_SubscribeToX509BundlesServer,
) error {
	bundles := map[string][]byte{"spiffe://" + trustDomain: a.ca.Raw}
	if err := stream.Send(&di.SubscribeToX509BundlesResponse{CaCertificates: bundles}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

const jwtKid = "bench"

var b64 = base64.RawURLEncoding

func (a *agent) SubscribeToJWTBundles(
	req *di.SubscribeToJWTBundlesRequest, stream di.DelegatedIdentity_SubscribeToJWTBundlesServer,
) error {
	point := a.jwtKey.PublicKey
	jwks, _ := json.Marshal(map[string]any{"keys": []map[string]string{{
		"kty": "EC", "crv": "P-256", "kid": jwtKid, "use": "jwt-svid",
		"x": b64.EncodeToString(point.X.FillBytes(make([]byte, 32))),
		"y": b64.EncodeToString(point.Y.FillBytes(make([]byte, 32))),
	}}})
	bundles := map[string][]byte{"spiffe://" + trustDomain: jwks}
	if err := stream.Send(&di.SubscribeToJWTBundlesResponse{Bundles: bundles}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func (a *agent) FetchJWTSVIDs(
	ctx context.Context, req *di.FetchJWTSVIDsRequest,
) (*di.FetchJWTSVIDsResponse, error) {
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	id, err := workloadID(req.Selectors)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	now := time.Now().Unix()
	expires := now + 300
	header, _ := json.Marshal(map[string]string{"alg": "ES256", "kid": jwtKid, "typ": "JWT"})
	claims, _ := json.Marshal(map[string]any{
		"aud": req.Audience, "exp": expires, "iat": now, "sub": id,
	})
	input := b64.EncodeToString(header) + "." + b64.EncodeToString(claims)
	digest := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, a.jwtKey, digest[:])
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	signature := append(r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))...)
	path := strings.TrimPrefix(id, "spiffe://"+trustDomain)
	return &di.FetchJWTSVIDsResponse{Svids: []*types.JWTSVID{{
		Token:     input + "." + b64.EncodeToString(signature),
		Id:        &types.SPIFFEID{TrustDomain: trustDomain, Path: path},
		ExpiresAt: expires,
		IssuedAt:  now,
	}}}, nil
}

func (a *agent) command(words []string) string {
	switch {
	case len(words) >= 1 && len(words) <= 2 && words[0] == "rotate":
		id := ""
		if len(words) == 2 {
			id = words[1]
		}
		if err := a.rotate(id, 0); err != nil {
			return "error: " + err.Error()
		}
	case len(words) == 2 && words[0] == "rotate_gradually":
		seconds, err := strconv.Atoi(words[1])
		if err != nil || seconds <= 0 {
			return "error: rotate_gradually takes a TTL in seconds"
		}
		// Every stream is its own goroutine: the answers go out on every core at once.
		if err := a.rotate("", time.Duration(seconds)*time.Second); err != nil {
			return "error: " + err.Error()
		}
	case len(words) == 1 && words[0] == "stats":
		a.mu.Lock()
		defer a.mu.Unlock()
		answers := append([]float64{}, a.answers...)
		out, _ := json.Marshal(map[string]any{
			"answers": answers, "subscribe_count": a.opened, "open_subscriptions": len(a.subs),
		})
		return string(out)
	default:
		return fmt.Sprintf("error: unknown command %q", strings.Join(words, " "))
	}
	return "ok"
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: goagent ADMIN_SOCKET SVID_TTL")
		os.Exit(2)
	}
	ttl, err := strconv.Atoi(os.Args[2])
	if err != nil || ttl <= 0 {
		fmt.Fprintln(os.Stderr, "goagent: SVID_TTL is a number of seconds")
		os.Exit(2)
	}
	a, err := newAgent(time.Duration(ttl) * time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goagent:", err)
		os.Exit(1)
	}
	os.Remove(os.Args[1])
	listener, err := net.Listen("unix", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "goagent:", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	di.RegisterDelegatedIdentityServer(server, a)
	go server.Serve(listener)
	fmt.Println("ready")
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		fmt.Println(a.command(strings.Fields(lines.Text())))
	}
	server.Stop()
}
