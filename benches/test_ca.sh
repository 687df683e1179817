# Sourced by the bench scripts: make_test_ca DIR makes a private CA (DIR/ca.crt) and a
# server certificate for 127.0.0.1 signed by it (DIR/tls.crt, DIR/tls.key).
make_test_ca() {
    local dir=$1
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 "${ec[@]}" -days 1 -subj /CN=converge-bench-ca \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    openssl req "${ec[@]}" -subj /CN=127.0.0.1 -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/tls.ext"
    openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 1 \
        -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2>/dev/null
}
