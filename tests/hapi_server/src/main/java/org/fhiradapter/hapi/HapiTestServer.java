package org.fhiradapter.hapi;

import ca.uhn.fhir.rest.server.RestfulServer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Starts HAPI FHIR JPA (R4, H2 in memory) on 127.0.0.1 under {@code /fhir}.
 *
 * <pre>java -jar hapi-test-server.jar [--port N] [--port-file PATH]</pre>
 *
 * With port 0 (the default) the system picks a free port; once the server answers, the port is
 * written to PATH (atomically) and a line "ready: URL" is printed on standard output.
 */
public final class HapiTestServer {

	private HapiTestServer() {}

	public static void main(String[] args) throws Exception {
		int port = 0;
		Path portFile = null;
		for (int i = 0; i < args.length; i++) {
			switch (args[i]) {
				case "--port" -> port = Integer.parseInt(args[++i]);
				case "--port-file" -> portFile = Path.of(args[++i]);
				default -> throw new IllegalArgumentException("unknown argument: " + args[i]);
			}
		}
		long started = System.nanoTime();
		AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext(HapiServerConfig.class);
		RestfulServer fhir = spring.getBean(RestfulServer.class);
		HapiServerConfig.acceptCodeableConceptWithOneValidCoding(spring);

		Server jetty = new Server();
		ServerConnector connector = new ServerConnector(jetty);
		connector.setHost("127.0.0.1");
		connector.setPort(port);
		jetty.addConnector(connector);
		ServletContextHandler context = new ServletContextHandler("/");
		ServletHolder holder = new ServletHolder("fhir", fhir);
		holder.setInitOrder(1); // initialise the FHIR servlet now, not on the first request
		context.addServlet(holder, "/fhir/*");
		jetty.setHandler(context);
		jetty.start();
		Runtime.getRuntime().addShutdownHook(new Thread(() -> {
			try {
				jetty.stop();
			} catch (Exception ignored) {
				// stopping anyway
			}
			spring.close();
		}));

		int actual = connector.getLocalPort();
		if (portFile != null) {
			Path partial = portFile.resolveSibling(portFile.getFileName() + ".part");
			Files.writeString(partial, Integer.toString(actual), StandardCharsets.US_ASCII);
			Files.move(partial, portFile, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
		}
		System.out.printf(
				"ready: http://127.0.0.1:%d/fhir (%.1f s)%n", actual, (System.nanoTime() - started) / 1e9);
		System.out.flush();
		jetty.join();
	}
}
