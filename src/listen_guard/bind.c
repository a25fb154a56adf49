/* bind() for processes that start TensorFlow servers: keep them off the network.
 *
 * TensorFlow 2.9's gRPC server always asks to listen on "0.0.0.0:PORT" (grpc_server_lib.cc),
 * which gRPC turns into a bind() to the wildcard address [::]:PORT, i.e. every interface.
 * Preloaded into a process (LD_PRELOAD), this bind() rewrites that one call: for a port the
 * process registered with listen_guard_only(PORT, ADDRESS), a bind to the wildcard address
 * becomes a bind to ADDRESS. Every other bind() goes through unchanged.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_RULES 64

struct rule {
    int port;
    int family; /* AF_INET or AF_INET6: the family of the address to listen on */
    struct in_addr v4;
    struct in6_addr v6;
};

static struct rule rules[MAX_RULES];
static int rule_count;
static pthread_mutex_t rules_lock = PTHREAD_MUTEX_INITIALIZER;

/* Which library this is: Python checks that the bind() in effect is this one. */
int listen_guard_version(void) { return 1; }

/* From now on, a wildcard bind() on PORT listens on ADDRESS (numeric IPv4 or IPv6) only.
 * Returns 0, or -1 if ADDRESS is not numeric or there is no room for another rule. */
int listen_guard_only(int port, const char *address) {
    struct rule rule = {.port = port};
    if (inet_pton(AF_INET, address, &rule.v4) == 1) {
        rule.family = AF_INET;
    } else if (inet_pton(AF_INET6, address, &rule.v6) == 1) {
        rule.family = AF_INET6;
    } else {
        return -1;
    }
    int result = -1;
    pthread_mutex_lock(&rules_lock);
    for (int i = 0; i < rule_count; i++) {
        if (rules[i].port == port) { /* the same port again (a later connect): the newest rule wins */
            rules[i] = rule;
            result = 0;
        }
    }
    if (result != 0 && rule_count < MAX_RULES) {
        rules[rule_count++] = rule;
        result = 0;
    }
    pthread_mutex_unlock(&rules_lock);
    return result;
}

static int find_rule(int port, struct rule *found) {
    int hit = 0;
    pthread_mutex_lock(&rules_lock);
    for (int i = 0; i < rule_count && !hit; i++) {
        if (rules[i].port == port) {
            *found = rules[i];
            hit = 1;
        }
    }
    pthread_mutex_unlock(&rules_lock);
    return hit;
}

static int is_wildcard6(const struct in6_addr *address) {
    static const unsigned char mapped_any[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0};
    return IN6_IS_ADDR_UNSPECIFIED(address) || memcmp(address, mapped_any, 16) == 0;
}

int bind(int fd, const struct sockaddr *address, socklen_t length) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (real_bind == NULL) {
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
        if (real_bind == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    struct rule rule;
    if (address != NULL && address->sa_family == AF_INET6 && length >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 asked;
        memcpy(&asked, address, sizeof asked);
        if (is_wildcard6(&asked.sin6_addr) && find_rule(ntohs(asked.sin6_port), &rule)) {
            if (rule.family == AF_INET6) {
                asked.sin6_addr = rule.v6;
            } else { /* an IPv4 address on a dual-stack socket: its v4-mapped form, ::ffff:a.b.c.d */
                memset(&asked.sin6_addr, 0, sizeof asked.sin6_addr);
                asked.sin6_addr.s6_addr[10] = asked.sin6_addr.s6_addr[11] = 0xff;
                memcpy(&asked.sin6_addr.s6_addr[12], &rule.v4, 4);
            }
            return real_bind(fd, (const struct sockaddr *)&asked, sizeof asked);
        }
    } else if (address != NULL && address->sa_family == AF_INET && length >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in asked;
        memcpy(&asked, address, sizeof asked);
        if (asked.sin_addr.s_addr == htonl(INADDR_ANY) && find_rule(ntohs(asked.sin_port), &rule)) {
            if (rule.family != AF_INET) { /* an IPv6 address cannot be had on an IPv4 socket */
                errno = EADDRNOTAVAIL;
                return -1;
            }
            asked.sin_addr = rule.v4;
            return real_bind(fd, (const struct sockaddr *)&asked, sizeof asked);
        }
    }
    return real_bind(fd, address, length);
}
