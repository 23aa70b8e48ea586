//! Certificates for TLS tests, made with rcgen: a CA, server and client
//! certificates it signs.

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A CA: (its certificate PEM, an issuer for server certificates).
pub fn make_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = ca_params(name).self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(ca_params(name), key))
}

/// A server certificate and key (PEM) for localhost and 127.0.0.1.
pub fn server_cert(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test server");
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client certificate and key (PEM) whose common name is `user`, as
/// PostgreSQL's `cert` authentication maps it to a role.
pub fn client_cert(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    user: &str,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, user);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}
